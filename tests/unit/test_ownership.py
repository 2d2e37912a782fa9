"""Ownership: refused paths and accounts, the record, and the facts that feed them (pure)."""

from __future__ import annotations

import pytest
from pyinfra.api import DeployError

from llamadeploy import units
from llamadeploy.config import HostConfig
from llamadeploy.roles.ownership import (
    ancestors,
    apt_files,
    apt_files_in,
    configured_dirs,
    files_in,
    ownership_problem,
    parents_in,
    record_lines,
    service_units,
    unit_problem,
)
from llamadeploy.roles.ownership.facts import OwnershipRecords, PathStates
from llamadeploy.units import UnitFiles, foreign

CFG = HostConfig.model_validate({"model": {"path": "/m/m.gguf"}, "server": {"allow_unauthenticated": True},
                                 "service": {"data_dir": "/srv/llm"}})
DIRS = configured_dirs(CFG)
FRESH = dict.fromkeys(DIRS.values(), "absent")


def test_a_fresh_host_passes_and_everything_is_recorded():
    assert ownership_problem(DIRS, FRESH, frozenset(), frozenset(), "llama", False) is None
    assert record_lines(DIRS, None, "llama") == sorted(
        ["account llama", "dir /opt/llama.cpp", "dir /srv/llm", "dir /etc/llama-server", "dir /var/cache/llama.cpp",
         "dir /opt/llama-server-compose"])


def test_a_foreign_directory_with_content_is_refused_naming_the_field():
    states = {**FRESH, "/srv/llm": "2 models notes.txt "}
    assert ownership_problem(DIRS, states, frozenset(), frozenset(), "llama", False) == (
        "llama_service.data_dir = '/srv/llm' exists on this host and holds 2 entries this deploy did not create "
        "(models, notes.txt); allowed: a new or empty directory, or one an earlier deploy created")
    many = {**FRESH, "/etc/llama-server": "7 a b c "}
    assert "holds 7 entries this deploy did not create (a, b, c, ...)" in str(
        ownership_problem(DIRS, many, frozenset(), frozenset(), None, False))
    assert "is a file on this host" in str(ownership_problem(DIRS, {**FRESH, "/srv/llm": "file"}, frozenset(),
                                                             frozenset(), None, False))


def test_empty_recorded_or_adopted_directories_pass():
    states = {**FRESH, "/srv/llm": "2 models notes.txt "}
    assert ownership_problem(DIRS, {**FRESH, "/srv/llm": "empty"}, frozenset(), frozenset(), None, False) is None
    assert ownership_problem(DIRS, states, frozenset({"dir /srv/llm"}), frozenset(), None, False) is None
    assert ownership_problem(DIRS, states, frozenset(), frozenset({"/srv/llm"}), None, False) is None  # adopted


def test_an_existing_account_is_refused_unless_recorded():
    msg = ownership_problem(DIRS, FRESH, frozenset(), frozenset(), "svc", True)
    assert msg == ("llama_service.user = 'svc' is an existing account this deploy did not create; allowed: a new "
                   "account (the deploy creates and records it), or one an earlier deploy created")
    assert ownership_problem(DIRS, FRESH, frozenset({"account svc"}), frozenset(), "svc", True) is None
    assert ownership_problem(DIRS, FRESH, frozenset(), frozenset(), None, True) is None  # docker mode: no account


def test_record_keeps_what_it_held():
    lines = record_lines({"f": "/a"}, frozenset({"dir /old", "account llama"}), None)
    assert lines == ["account llama", "dir /a", "dir /old"]


def test_facts_parse_records_and_path_states():
    out = ["== llama-server.owned", "dir /opt/llama.cpp", "account llama", "== other.owned", "dir /srv/x"]
    assert OwnershipRecords().process(out) == {"llama-server.owned": frozenset({"dir /opt/llama.cpp", "account llama"}),
                                               "other.owned": frozenset({"dir /srv/x"})}
    assert OwnershipRecords().process([]) == {}
    states = PathStates().process(["/a\tabsent", "/b\t0 ", "/c\t2 models notes.txt ", "/d\tfile"])
    assert states == {"/a": "absent", "/b": "empty", "/c": "2 models notes.txt", "/d": "file"}


def test_model_files_a_run_places_are_recorded_and_read_back_per_directory():
    lines = record_lines({"f": "/a"}, frozenset({"file /a/models/old.gguf"}), None, ["/a/models/new.gguf"])
    assert lines == ["dir /a", "file /a/models/new.gguf", "file /a/models/old.gguf"]
    record = frozenset([*lines, "file /a/models/sub/x.gguf", "file /b/models/y.gguf", "dir /a/models"])
    assert files_in(record, "/a/models") == {"new.gguf", "old.gguf"}
    assert files_in(record, "/a/models/") == {"new.gguf", "old.gguf"}
    assert files_in(None, "/a/models") == set()


def test_parents_the_deploy_creates_are_recorded_and_removed_deepest_first():
    assert ancestors(["/srv/llm/data", "/srv/llm/etc", "/opt/llama.cpp", "/srv/llm/data/"]) == ["/srv/llm", "/opt", "/srv"]
    lines = record_lines({"f": "/srv/llm/data"}, None, None, parents=["/srv/llm"])
    assert lines == ["dir /srv/llm/data", "parent /srv/llm"]
    assert parents_in(frozenset([*lines, "parent /srv", "parent /srv/llm/x"])) == ["/srv/llm/x", "/srv/llm", "/srv"]
    assert parents_in(None) == []


def test_a_service_name_whose_unit_someone_else_made_is_refused():
    """``llama_service.name: ssh`` would overwrite and restart sshd's unit, ``sshd`` is its alias
    link, a masked name or an operator's own unit file is theirs too."""
    assert service_units("ssh") == ["ssh.service", "ssh-fence.service"]
    vendor = {"ssh.service": [("/lib/systemd/system/ssh.service", "file"), ("/usr/lib/systemd/system/ssh.service", "file")]}
    assert unit_problem("ssh", vendor, frozenset()) == (
        "llama_service.name = 'ssh': this host already has /lib/systemd/system/ssh.service, a unit this deploy did "
        "not create (it would overwrite, restart and on uninstall remove it); allowed: a name no unit on the host "
        "has, or one an earlier deploy created")
    alias = {"sshd.service": [("/etc/systemd/system/sshd.service", "link")]}
    assert "/etc/systemd/system/sshd.service" in unit_problem("sshd", alias, frozenset())
    # a mask over a unit a record names is the operator's now; a SysV script's generated unit
    masked = {"llama-server.service": [("/etc/systemd/system/llama-server.service", "link")]}
    assert unit_problem("llama-server", masked, frozenset({"unit llama-server.service"})) is not None
    sysv = {"apache2.service": [("/run/systemd/generator.late/apache2.service", "file")]}
    assert "/run/systemd/generator.late/apache2.service" in unit_problem("apache2", sysv, frozenset())
    # a vendor unit is never ours, even when a record names the unit (ours would only shadow it)
    shadowing = {"x.service": [("/etc/systemd/system/x.service", "ours"), ("/lib/systemd/system/x.service", "file")]}
    assert "/lib/systemd/system/x.service" in unit_problem("x", shadowing, frozenset({"unit x.service"}))


def test_units_the_deploy_wrote_or_recorded_pass_and_are_recorded():
    assert unit_problem("llama-server", {}, frozenset()) is None  # a fresh host
    ours = {"llama-server.service": [("/etc/systemd/system/llama-server.service", "ours")]}
    assert unit_problem("llama-server", ours, frozenset()) is None  # written before units were recorded
    edited = {"llama-server.service": [("/etc/systemd/system/llama-server.service", "file")]}
    assert unit_problem("llama-server", edited, frozenset({"unit llama-server.service"})) is None
    assert unit_problem("llama-server", edited, frozenset()) is not None  # not recorded, not our header
    assert "unit llama-server.service" in record_lines(DIRS, None, "llama", units=service_units("llama-server"))


def test_unit_files_fact_reads_paths_and_kinds():
    out = ["ssh.service\t/lib/systemd/system/ssh.service\tfile", "llama-server.service\t"
           "/etc/systemd/system/llama-server.service\tours", ""]
    assert UnitFiles().process(out) == {"ssh.service": [("/lib/systemd/system/ssh.service", "file")],
                                        "llama-server.service": [("/etc/systemd/system/llama-server.service", "ours")]}


def test_unit_files_fact_command_on_a_real_tree(tmp_path):
    """The fact's shell, run here against a made-up tree (its directories replaced by tmp_path's)."""
    import subprocess

    from llamadeploy import units as facts

    etc, lib = tmp_path / "etc", tmp_path / "lib"
    etc.mkdir()
    lib.mkdir()
    (etc / "ours.service").write_text("# Managed by llamadeploy (pyinfra). Local edits...\n[Unit]\n")
    (etc / "theirs.service").write_text("[Unit]\nDescription=x\n")
    (lib / "pkg.service").write_text("[Unit]\n")
    (etc / "alias.service").symlink_to(lib / "pkg.service")
    cmd = UnitFiles().command(["ours.service", "theirs.service", "pkg.service", "alias.service", "none.service"])
    fakes = {facts.UNIT_DIRS[0]: str(etc), "/lib/systemd/system": str(lib)}
    for n, real in enumerate(facts.UNIT_DIRS):
        cmd = cmd.replace(f" {real} ", f" {fakes.get(real, f'/nonexistent/{n}')} ").replace(
            f" {real};", f" {fakes.get(real, f'/nonexistent/{n}')};")
    out = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, check=True, timeout=10).stdout
    assert UnitFiles().process(out.splitlines()) == {
        "ours.service": [(f"{etc}/ours.service", "ours")], "theirs.service": [(f"{etc}/theirs.service", "file")],
        "pkg.service": [(f"{lib}/pkg.service", "file")], "alias.service": [(f"{etc}/alias.service", "link")]}


class UnitHost:
    """The current host, as :mod:`llamadeploy.units` reads it: its ``UnitFiles`` fact and no-ops."""

    name = "h1"

    def __init__(self, found: dict[str, list[tuple[str, str]]]):
        self.found, self.noops = found, []

    def get_fact(self, fact, names):
        assert fact is UnitFiles
        return {n: self.found[n] for n in names if n in self.found}

    def noop(self, text: str) -> None:
        self.noops.append(text)


RPC = "/etc/systemd/system/ggml-rpc-server.service"


def test_a_fixed_name_unit_is_the_deploys_only_with_its_header():
    """``ggml-rpc-server.service`` or ``haproxy-fence.service`` may be an operator's own: the
    deploy's is the file in /etc/systemd/system that begins with its header (or a record names)."""
    assert foreign("ggml-rpc-server.service", [(RPC, "ours")]) == []
    assert foreign("ggml-rpc-server.service", [(RPC, "file")]) == [RPC]  # one run by hand
    assert foreign("ggml-rpc-server.service", [(RPC, "file")], frozenset({"unit ggml-rpc-server.service"})) == []
    assert foreign("ggml-rpc-server.service", [(RPC, "link")]) == [RPC]  # a mask
    vendor = "/lib/systemd/system/ggml-rpc-server.service"
    assert foreign("ggml-rpc-server.service", [(RPC, "ours"), (vendor, "file")]) == [vendor]
    assert foreign("ggml-rpc-server.service", []) == []


def test_someone_elses_unit_is_refused_before_it_is_written_and_left_alone_when_removing(monkeypatch):
    fake = UnitHost({"ggml-rpc-server.service": [(RPC, "file")]})
    monkeypatch.setattr(units, "host", fake)
    with pytest.raises(DeployError, match=r"^preflight refused host h1: llama_role = 'rpc_worker': this host already "
                                          r"has /etc/systemd/system/ggml-rpc-server.service, a unit this deploy did "
                                          r"not create .*; allowed: a host without one$"):
        units.refuse_foreign({"ggml-rpc-server.service": "llama_role = 'rpc_worker'", "other.service": "x"},
                             "a host without one")
    assert units.left_alone("ggml-rpc-server.service") is True
    assert fake.noops == [f"{RPC} is not the deploy's (its first line is not '# Managed by llamadeploy'): left alone"]
    fake.found = {"ggml-rpc-server.service": [(RPC, "ours")]}
    units.refuse_foreign({"ggml-rpc-server.service": "llama_role = 'rpc_worker'"}, "a host without one")
    assert units.left_alone("ggml-rpc-server.service") is False
    fake.found = {}  # none at all: written, nothing to leave alone
    units.refuse_foreign({"ggml-rpc-server.service": "llama_role = 'rpc_worker'"}, "a host without one")
    assert units.left_alone("ggml-rpc-server.service") is False


def test_a_docker_image_is_recorded_only_when_the_run_brings_it():
    """``image REF``: the deploy loaded or pulled it. Uninstall removes only an image a record
    names, so the operator's image, or one another service brought, stays."""
    ref = "llamadeploy/llama.cpp:server-b11434"
    assert f"image {ref}" in record_lines(DIRS, None, None, images=[ref])
    assert not [line for line in record_lines(DIRS, None, None) if line.startswith("image ")]
    # an image recorded by an earlier run stays recorded when this run finds it on the host
    assert f"image {ref}" in record_lines(DIRS, frozenset({f"image {ref}"}), None)


def test_an_earlier_deploy_without_records_is_adopted_only_where_its_manifest_shows_it():
    """A host deployed before records existed: the config directory (its manifest is there), the
    prefix holding the binary it ran, the data directory holding its model, the compose project it
    names and a cache directory with package records are the earlier deploy's. A data_dir the
    inventory now points at an operator's directory is not: it is checked like on a fresh host."""
    from llamadeploy.manifest import Manifest, PlanRecord
    from llamadeploy.roles.ownership import adopted_dirs

    plan = PlanRecord(limit=1, model_bytes=1, kv_bytes_per_token=1, ctx_size=512, parallel=1)
    old = Manifest(mode="native", host="127.0.0.1", port=8080, alias="m", args=[], memory_plan=plan,
                   model_path="/var/lib/llama-server/models/m.gguf", model_files={"m.gguf": "a" * 64},
                   binary="/opt/llama.cpp/current/bin/llama-server")
    default = configured_dirs(HostConfig.model_validate({"model": {"path": "/m/m.gguf"},
                                                         "server": {"allow_unauthenticated": True}}))
    assert adopted_dirs(default, old, True) == {"/etc/llama-server", "/opt/llama.cpp", "/var/lib/llama-server",
                                                 "/var/cache/llama.cpp"}
    assert adopted_dirs(default, old, False) == {"/etc/llama-server", "/opt/llama.cpp", "/var/lib/llama-server"}
    # the inventory now says data_dir /srv/llm: the earlier deploy's model was elsewhere
    assert "/srv/llm" not in adopted_dirs(DIRS, old, True)
    states = {**FRESH, "/srv/llm": "2 models notes.txt "}
    assert "llama_service.data_dir = '/srv/llm'" in str(ownership_problem(DIRS, states, frozenset(),
                                                                          adopted_dirs(DIRS, old, True), None, False))
    docker = old.model_copy(update={"mode": "docker", "binary": None, "compose_project": "/opt/llama-server-compose"})
    assert "/opt/llama-server-compose" in adopted_dirs(default, docker, False)
    # no manifest: no server deployed here; a front's or monitor's cache directory with its package records
    assert adopted_dirs(default, None, True) == {"/var/cache/llama.cpp"}
    assert adopted_dirs(default, None, False) == frozenset()


def test_apt_sources_and_keys_the_settings_write_are_recorded_and_read_back_by_name():
    """Docker's repository (``engine = "docker-ce"``) and Debian's non-free for NVIDIA
    (``install = "distro"``) are files the deploy writes; recorded where the host had none, they
    are what uninstall removes by name, and nothing else a record names as a file."""
    base = {"server": {"allow_unauthenticated": True}}
    assert apt_files(CFG) == []
    docker_ce = HostConfig.model_validate({**base, "mode": "docker", "docker": {"engine": "docker-ce"}})
    assert apt_files(docker_ce) == ["/etc/apt/keyrings/docker.asc", "/etc/apt/sources.list.d/docker.list"]
    assert apt_files(HostConfig.model_validate({**base, "mode": "docker"})) == []
    cuda = HostConfig.model_validate({**base, "build": {"backend": "cuda"}, "gpu": {"install": "distro"}})
    assert apt_files(cuda) == ["/etc/apt/sources.list.d/llamadeploy-nvidia.list"]
    record = frozenset(record_lines(DIRS, None, "llama", placed=["/srv/llm/models/m.gguf", *apt_files(docker_ce)]))
    assert apt_files_in(record) == apt_files(docker_ce)
    assert apt_files_in(record, kept_engine=True) == []  # a kept engine keeps its source and key
    assert files_in(record, "/srv/llm/models") == {"m.gguf"}
    # a model file outside today's data directory (recorded before data_dir changed) is no apt file
    assert apt_files_in(frozenset(record_lines(DIRS, None, None, placed=["/old/models/x.gguf"]))) == []


def test_a_fence_is_recorded_whole_and_a_bound_dropin_only_for_a_distributions_unit():
    from llamadeploy.roles.firewall import bound_dropin, fence_entries, guard_paths

    lines = fence_entries("haproxy", "llamadeploy_haproxy_exporter", "/etc/haproxy/llamadeploy-exporter.nft")
    assert lines == ["file /etc/haproxy/llamadeploy-exporter.nft", "unit haproxy-fence.service",
                     f"file {guard_paths('haproxy', 'llamadeploy_haproxy_exporter')[1]}",
                     "table inet llamadeploy_haproxy_exporter", f"file {bound_dropin('haproxy')[1]}"]
    own = fence_entries("llama-server", "llamadeploy_llama_server", "/etc/llama-server/firewall.nft", bound=False)
    assert not [line for line in own if ".service.d/llamadeploy-fence.conf" in line]


def test_a_front_and_a_monitor_record_their_files_fence_and_only_their_package_records_directory():
    """A front or a monitor keeps a record too (issue 21: every host): its certificate (with TLS),
    its drain marks and fence; a monitor's targets, rules, key, Alertmanager's secrets (with one)
    and fence. Of the configured directories only ``cache_dir``, its package records, is made."""
    from llamadeploy.roles import front, monitor

    plain = HostConfig.model_validate({"role": "front"})
    tls = HostConfig.model_validate({"role": "front", "front": {"tls_pem": "PEM"}})
    assert configured_dirs(plain) == {"llama_service.cache_dir": plain.service.cache_dir}
    assert f"file {front.PEM}" in front.owned_entries(tls) and f"file {front.PEM}" not in front.owned_entries(plain)
    assert {"dir /var/lib/llamadeploy-front", f"file {front.EXPORTER_RULES}", "unit haproxy-fence.service",
            f"table inet {front.EXPORTER_TABLE}"} <= set(front.owned_entries(plain))
    mon = HostConfig.model_validate({"role": "monitor"})
    am = HostConfig.model_validate({"role": "monitor", "monitor": {"alertmanager": {
        "webhook": {"url": "https://hooks.example/x"}}}})
    assert {f"file {p}" for p in monitor.PROMETHEUS_FILES} <= set(monitor.owned_entries(mon))
    assert f"table inet {monitor.TABLE}" in monitor.owned_entries(mon)
    assert not {f"file {p}" for p in monitor.ALERTMANAGER_FILES} & set(monitor.owned_entries(mon))
    assert {f"file {p}" for p in monitor.ALERTMANAGER_FILES} <= set(monitor.owned_entries(am))
    lines = record_lines(configured_dirs(mon), None, None, fixed=monitor.owned_entries(mon))
    assert f"dir {mon.service.cache_dir}" in lines and not [line for line in lines if line.startswith(
        ("dir /opt", f"dir {mon.service.data_dir}", "account"))]


def test_the_node_exporter_and_an_rpc_worker_record_their_fences():
    from llamadeploy.roles import node_exporter, rpc

    assert node_exporter.owned_entries(monitored=False, on_gpu_host=True) == []
    plain = node_exporter.owned_entries(monitored=True, on_gpu_host=False)
    assert f"table inet {node_exporter.TABLE}" in plain and not [line for line in plain if "gpu" in line]
    gpu = node_exporter.owned_entries(monitored=True, on_gpu_host=True)
    assert {f"file {p}" for p in node_exporter.GPU_FILES} | {f"file {node_exporter.GPU_TEXTFILE}"} <= set(gpu)
    worker = HostConfig.model_validate({"role": "rpc_worker"})
    lines = rpc.owned_entries(worker)
    assert f"file {rpc.rules_path(worker)}" in lines and f"unit {rpc.UNIT}.service" in lines
    assert f"table inet {rpc.TABLE}" in lines


def test_a_prefix_another_native_service_runs_its_releases_from_is_refused():
    """Two native services on one prefix share its ``current`` link: a deploy of one would switch
    what the other runs at its next restart, and prune builds only the other's releases use."""
    from llamadeploy.roles.ownership import prefix_problem

    first = frozenset({"dir /opt/llama.cpp", "unit llama-server.service", "account llama"})
    msg = prefix_problem("/opt/llama.cpp", "llama-two", {"llama-server.owned": first})
    assert msg is not None and msg.startswith("llama_service.prefix = '/opt/llama.cpp' holds the releases of "
                                              "service 'llama-server' on this host")
    assert prefix_problem("/opt/llama.cpp", "llama-server", {"llama-server.owned": first}) is None  # its own
    assert prefix_problem("/srv/two", "llama-two", {"llama-server.owned": first}) is None
    # a docker-mode service records the prefix but runs no unit from it
    docker = frozenset({"dir /opt/llama.cpp", "image llama:1"})
    assert prefix_problem("/opt/llama.cpp", "llama-two", {"other.owned": docker}) is None
    # two services an earlier version let share the prefix: each goes on, as before
    second = frozenset({"dir /opt/llama.cpp", "unit llama-two.service"})
    assert prefix_problem("/opt/llama.cpp", "llama-two", {"llama-server.owned": first, "llama-two.owned": second}) is None
    # a service that switched from docker to native records the prefix but ran no unit from it
    assert prefix_problem("/opt/llama.cpp", "llama-two", {"llama-server.owned": first, "llama-two.owned": docker}) \
        is not None
    # an RPC worker runs ggml-rpc-server from its prefix's current link: that prefix is taken too
    worker = frozenset({"dir /opt/llama.cpp", "unit ggml-rpc-server.service"})
    assert prefix_problem("/opt/llama.cpp", "llama-two", {"llama-server.owned": worker}) is not None
    assert prefix_problem("/opt/llama.cpp", "llama-server", {"llama-server.owned": worker}) is None


def test_a_server_an_earlier_deploy_left_without_records_is_adopted_also_when_the_host_is_now_a_front():
    """Adoption looks for every directory a server's deploy makes, whatever the host's role now:
    a front's configured directories are only its cache, and the evidence of the rest must not
    be looked up there (it raised KeyError)."""
    from llamadeploy.manifest import Manifest
    from llamadeploy.roles.ownership import adopted_dirs, service_dirs

    front = HostConfig.model_validate({"role": "front"})
    m = Manifest.model_construct(binary="/opt/llama.cpp/current/bin/llama-server",
                                 model_path="/var/lib/llama-server/models/m.gguf", compose_project=None)
    assert adopted_dirs(configured_dirs(front), m, True) == frozenset({front.service.cache_dir})
    assert adopted_dirs(service_dirs(front), m, True) == frozenset(
        {"/opt/llama.cpp", "/var/lib/llama-server", "/etc/llama-server", front.service.cache_dir})
