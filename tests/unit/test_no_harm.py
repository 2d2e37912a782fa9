"""No harm, pure parts: policy through extra_args, control characters in rendered files, names
from a Hub listing, and the port preflight (issue 21)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from llamadeploy.config import DENIED_FLAGS, OWNED_FLAGS, HostConfig
from llamadeploy.facts import parse_help_flags
from llamadeploy.hostdata import parse_config
from llamadeploy.render import RenderError, control_characters, render
from llamadeploy.roles.model.source import listed_name_problem
from llamadeploy.roles.preflight import listened_ports, port_problem
from llamadeploy.roles.preflight.facts import PortHolder, PortHolders

from .test_config import problems


@pytest.mark.parametrize("args,field", [
    (["--host", "0.0.0.0"], "llama_server.host"),
    (["--port=9000"], "llama_server.port"),
    (["-m", "/x.gguf"], "llama_model"),
    (["--alias", "gpt-4"], "llama_model.alias"),
    (["--rpc", "10.0.0.9:50052"], "llama_rpc.workers_group"),
    (["-ngl", "99"], "llama_server.gpu_layers"),
    (["--ssl-key-file", "/k.pem"], "llama_front.tls_pem"),
    (["--slot-save-path", "/tmp"], "nothing: the hardened unit writes no files"),
    (["--log-file", "/tmp/l"], "nothing: the hardened unit writes no files"),
    (["-c", "4096"], "llama_server.ctx_size"),
    (["--models-preset", "/p.ini"], "llama_models and llama_router (router mode)"),
    (["--pooling", "mean"], "llama_models[].kind and llama_models[].pooling"),
])
def test_flags_the_schema_owns_are_refused_in_extra_args_naming_the_field(args, field):
    (msg,) = problems(llama_server={"extra_args": ["--no-webui", *args]})
    flag = args[0].split("=")[0]
    assert msg.startswith("host h1: llama_server.extra_args = ")
    assert f"{flag} is set by the deploy; use {field}" in msg


@pytest.mark.parametrize("args,why", [
    (["--tools", "exec_shell_command"], "gives every client tools that run commands"),
    (["--tools-runtime", "ssh:ops@db1"], "gives every client tools that run commands"),
    (["-ag"], "gives every client tools"),
    (["--mcp-servers-json", "{}"], "gives every client tools"),
    (["--webui-mcp-proxy"], "gives every client tools"),
    (["--path", "/etc"], "serves or reads the host's files"),
    (["--media-path=/home"], "serves or reads the host's files"),
    (["--props"], "lets any client change the server's settings"),
    (["-mmu", "https://example.com/p.gguf"], "downloads a file at start that no sha256 pins"),
    (["-hfd", "someone/draft"], "downloads a file at start that no sha256 pins"),
    (["--reuse-port"], "lets another process bind the same port"),
    (["--api-prefix", "/llm"], "moves the API off the paths the gate"),
])
def test_flags_that_open_what_the_deploy_keeps_closed_are_refused(args, why):
    (msg,) = problems(llama_server={"extra_args": ["--no-webui", *args]})
    flag = args[0].split("=")[0]
    assert msg.startswith("host h1: llama_server.extra_args = ")
    assert f"{flag} is not allowed: it {why}" in msg


@pytest.mark.parametrize("args", [["--no-agent"], ["-no-ag"], ["--no-webui-mcp-proxy"], ["--mmproj", "/m/proj.gguf"],
                                  ["--lora", "/m/a.gguf"], ["--spec-default"]])
def test_their_off_switches_and_local_files_stay_allowed(args):
    assert problems(llama_server={"extra_args": args}) == []


def test_every_refused_flag_is_a_real_one_and_every_preset_is_refused():
    """The lists name flags the binary has (a typo would refuse nothing), and each of its model
    presets (a Hub download, with its own port, context and slots) is refused."""
    flags = set(parse_help_flags((Path(__file__).parent / "data/llama-server-b11434-help.txt").read_text().splitlines()))
    assert (set(OWNED_FLAGS) | set(DENIED_FLAGS)) - flags == set()
    presets = {f for f in flags if f.endswith(("-default", "-spec"))} - {"--spec-default"}
    presets.add("--fim-qwen-1.5b-default")  # in the help too; the help parser reads no "." in a name
    assert len(presets) >= 11, presets
    for flag in sorted(presets):
        (msg,) = problems(llama_server={"extra_args": [flag]})
        assert f"{flag} is not allowed: it is a model preset of llama-server's" in msg, msg


def test_owned_flags_cover_what_the_deploy_renders():
    """Every flag server_args renders for the default host is owned: none can be overridden."""
    from llamadeploy.facts import CpuInfo
    from llamadeploy.tuning import MemoryPlan, server_args

    cfg, errs = parse_config("h1", [{"llama_model": {"path": "/m/m.gguf"}, "llama_server": {
        "allow_unauthenticated": True, "api_key": "k" * 20, "gpu_layers": 0}}])
    assert cfg is not None, errs
    plan = MemoryPlan(ctx_size=4096, parallel=4, limit=1 << 30, model_bytes=1, kv_bytes_per_token=1, overhead=1,
                      swa_full=True, load_mode="mmap", chat_template="gemma", cache_ram_mib=512)
    args = server_args(cfg, CpuInfo(logical=4, physical=2, sockets=2, numa_nodes=2), plan, "/m/m.gguf", "m")
    rendered = {a for a in args if a.startswith("-")}
    assert rendered - set(OWNED_FLAGS) == set(), rendered - set(OWNED_FLAGS)


@pytest.mark.parametrize("data", [
    {"llama_server": {"extra_args": ["--lora", "/x.gguf\nExecStartPre=/bin/sh"]}},
    {"llama_server": {"extra_args": ["--no-webui\r"]}},
    {"llama_front": {"bind": "0.0.0.0:80\n  acl x always_true"}},
    {"llama_model": {"path": "/m/a\nb.gguf"}},
    {"llama_model": {"path": "/m/has space.gguf"}},
    {"llama_build": {"tarball": "/t/src\x00.tar.gz", "source": "tarball"}},
])
def test_control_characters_and_free_text_are_refused_naming_the_field(data):
    (msg,) = problems(**data)
    section, values = next(iter(data.items()))
    assert msg.startswith(f"host h1: {section}.{next(iter(values))} = "), msg


def test_front_bind_is_an_address():
    assert problems(llama_front={"bind": "10.0.0.5"}) == []
    assert problems(llama_front={"bind": "::"}) == []
    (msg,) = problems(llama_front={"bind": "*"})
    assert "must be an IP address to bind" in msg


def test_renderer_refuses_a_control_character_naming_the_variable():
    with pytest.raises(RenderError, match=r"template service/llama-nvidia-devices.service.j2: the value of "
                                          r"unit_name holds a control character"):
        render("service/llama-nvidia-devices.service.j2", unit_name="x\n[Service]", device_commands=["/usr/bin/nvidia-modprobe -u -c=0"])
    assert "x-y" in render("service/llama-nvidia-devices.service.j2", unit_name="x-y", device_commands=["/usr/bin/nvidia-modprobe -u -c=0"])


def test_a_render_refusal_is_a_pyinfra_error():
    """Raised while pyinfra prepares, a refused value is one pyinfra error (a ``DeployError``, as a
    config error is), not a traceback, and it names the template and the variable."""
    from pyinfra.api import DeployError

    with pytest.raises(DeployError, match=r"template service/llama-nvidia-devices.service.j2: the value of "):
        render("service/llama-nvidia-devices.service.j2", unit_name="x\n[Service]", device_commands=[])


def test_control_characters_are_found_inside_objects():
    @dataclass
    class Backend:
        name: str
        address: str

    assert control_characters({"backends": [Backend("a", "10.0.0.1"), Backend("b", "10.0.0.2\nserver x")]}) \
        == "backends[1].address"
    assert control_characters({"backends": [Backend("a", "10.0.0.1")], "port": 80, "t": "a\tb"}) is None


def test_the_renderer_checks_what_a_template_prints_too():
    """The finalize hook: a value computed inside the template is checked as it is printed."""
    from llamadeploy.render import _ENV

    with pytest.raises(RenderError):
        _ENV.from_string("{{ a ~ b }}").render(a="x", b="\n")


@pytest.mark.parametrize("name,ok", [
    ("gemma-3-270m-q4_k_m.gguf", True),
    ("sub/dir/model-00001-of-00002.gguf", True),
    ("a\nb.gguf", False),
    ("../etc/passwd.gguf", False),
    ("-rf.gguf", False),
    ("model;reboot.gguf", False),
    ("model $(id).gguf", False),
])
def test_hub_listing_names_are_validated_like_inventory_names(name, ok):
    assert (listed_name_problem("org/repo", name) is None) is ok


def test_port_held_by_another_process_is_refused_naming_it():
    cfg = HostConfig.model_validate({"model": {"path": "/m/m.gguf"}, "server": {"port": 22,
                                                                               "allow_unauthenticated": True}})
    [(field, port, ours)] = listened_ports(cfg, docker_serves=True)
    sshd = PortHolder(612, "sshd", "/system.slice/ssh.service", "0.0.0.0:22")
    msg = port_problem(field, port, ours, [sshd])
    assert msg == ("llama_server.port = 22: 0.0.0.0:22 is held by sshd (pid 612, /system.slice/ssh.service) on this "
                   "host; allowed: a port no other service listens on")
    mine = PortHolder(700, "llama-server", "/system.slice/llama-server.service", "0.0.0.0:22")
    proxy = PortHolder(800, "docker-proxy", "/system.slice/docker.service", "0.0.0.0:22")
    assert port_problem(field, port, ours, [mine, proxy]) is None  # the deploy's docker release serves
    # no docker release of the deploy's serves: a docker-proxy there publishes someone's container
    [(field, port, ours)] = listened_ports(cfg)
    assert port_problem(field, port, ours, [mine]) is None
    assert port_problem(field, port, ours, [proxy]) == (
        "llama_server.port = 22: 0.0.0.0:22 is held by docker-proxy (pid 800, /system.slice/docker.service) on this "
        "host; allowed: a port no other service listens on")
    assert port_problem(field, port, ours, []) is None
    other_unit = PortHolder(701, "llama-server", "/system.slice/llama-server-b.service", "0.0.0.0:22")
    assert port_problem(field, port, ours, [other_unit]) is not None
    dockerd = PortHolder(801, "dockerd", "/system.slice/docker.service", "0.0.0.0:22")  # not its proxy
    assert port_problem(field, port, ours, [dockerd]) is not None


@pytest.mark.parametrize(("data", "want"), [
    ({"role": "front"}, [("llama_front.port", 8080, "haproxy.service"),
                         ("llama_front.metrics_port", 8405, "haproxy.service")]),
    ({"role": "front", "front": {"tls_pem": "PEM"}}, [("llama_front.tls_port", 8443, "haproxy.service"),
                                                      ("llama_front.metrics_port", 8405, "haproxy.service")]),
    ({"role": "front", "front": {"tls_pem": "PEM", "redirect_http": True, "port": 80, "tls_port": 443}},
     [("llama_front.port", 80, "haproxy.service"), ("llama_front.tls_port", 443, "haproxy.service"),
      ("llama_front.metrics_port", 8405, "haproxy.service")]),
    ({"role": "monitor"}, [("llama_monitor.port", 9090, "prometheus.service")]),
    ({"role": "monitor", "monitor": {"alertmanager": {"webhook": {"url": "https://h.example.com/x"}}}},
     [("llama_monitor.port", 9090, "prometheus.service"),
      ("llama_monitor.alertmanager.port", 9093, "prometheus-alertmanager.service")]),
    ({"role": "rpc_worker"}, [("llama_rpc.port", 50052, "ggml-rpc-server.service")]),
])
def test_every_role_checks_the_ports_it_listens_on(tmp_path, data, want):
    """Fronts, monitors and RPC workers fail to bind on a held port as a server does: each
    port its role listens on is checked, with its field, and only its own unit may hold it."""
    if "front" in data and "tls_pem" in data["front"]:
        cert, key = _pem(tmp_path, "front")
        pem = tmp_path / "front.pem"
        pem.write_text(cert + key)
        pem.chmod(0o600)
        data["front"]["tls_pem"] = str(pem)
    cfg = HostConfig.model_validate(data)
    got = listened_ports(cfg)
    assert [(f, p, ours[0]) for f, p, ours in got] == want
    nginx = PortHolder(9, "nginx", "/system.slice/nginx.service", "0.0.0.0:1")
    for field, port, ours in got:
        assert port_problem(field, port, ours, [nginx]).startswith(f"{field} = {port}: 0.0.0.0:1 is held by nginx")
        assert port_problem(field, port, ours, [PortHolder(10, "x", f"/system.slice/{ours[0]}", "0.0.0.0:1")]) is None


def test_port_holders_parsed_from_ss():
    out = ["612 0.0.0.0:22 \"sshd\" /system.slice/ssh.service", "612 [::]:22 \"sshd\" /system.slice/ssh.service",
           "garbage"]
    assert PortHolders().process(out) == [PortHolder(612, "sshd", "/system.slice/ssh.service", "0.0.0.0:22"),
                                          PortHolder(612, "sshd", "/system.slice/ssh.service", "[::]:22")]


def test_a_config_error_is_one_pyinfra_error_without_a_traceback(tmp_path):
    """pyinfra's own error line (a DeployError), not a Python traceback; nothing runs (``@local``:
    validation happens while pyinfra prepares, before any operation)."""
    import subprocess
    import sys
    from pathlib import Path

    inv = tmp_path / "inv.py"
    inv.write_text('hosts = [("@local", {"llama_server": {"port": "x"}, "llama_model": {"path": "/m/m.gguf"}})]\n')
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([str(Path(sys.executable).with_name("pyinfra")), "-y", str(inv), "deploy.py"], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in out, out
    assert "pyinfra error" in out and "invalid llama configuration, nothing was changed on any host:" in out
    assert "- host @local: llama_server.port = 'x': Input should be a valid integer" in out


def _pem(tmp_path, name: str) -> tuple[str, str]:
    import subprocess

    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-subj", f"/CN={name}", "-days", "2", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert.read_text(), key.read_text()


def test_front_pem_is_checked_with_openssl_and_secret_files_must_be_private(tmp_path):
    from llamadeploy.hostdata import controller_file_problems

    cert, key = _pem(tmp_path, "front")
    _, other_key = _pem(tmp_path, "other")

    def check(text: str, mode: int = 0o600) -> list[str]:
        pem = tmp_path / "t.pem"
        pem.write_text(text)
        pem.chmod(mode)
        cfg = HostConfig.model_validate({"role": "front", "front": {"tls_pem": str(pem)}})
        return controller_file_problems("lb1", cfg)

    assert check(cert + key) == []
    (bad,) = check(cert + other_key)
    assert bad.endswith("its private key does not belong to its (first) certificate")
    assert bad.startswith(f"host lb1: llama_front.tls_pem = '{tmp_path}/t.pem': ")
    assert "holds no private key" in check(cert)[0]
    assert "holds no certificate" in check("garbage\n")[0]
    assert "mode 644 lets others read the secret; chmod 600" in check(cert + key, 0o644)[0]
    token = tmp_path / "hf-token"
    token.write_text("hf_x\n")
    token.chmod(0o640)
    cfg = HostConfig.model_validate({"model": {"catalog": "qwen2.5-3b", "hf_token_file": str(token)},
                                     "server": {"allow_unauthenticated": True}})
    (msg,) = controller_file_problems("h1", cfg)
    assert msg == f"host h1: llama_model.hf_token_file = '{token}': mode 640 lets others read the secret; chmod 600 {token}"


def test_a_service_package_the_host_has_is_ours_only_when_recorded():
    from llamadeploy.packages import foreign

    have = {"haproxy": {"2.6.12-1"}, "socat": {"1.7"}}
    assert foreign(["haproxy"], have, []) == ["haproxy"]  # the operator's: refused
    assert foreign(["haproxy"], have, ["haproxy", "socat"]) == []  # installed by a deploy of ours
    assert foreign(["haproxy"], {}, []) == []  # not there: the deploy installs (and records) it
    assert foreign(["prometheus", "prometheus-alertmanager"], {"prometheus-alertmanager": {"0.25"}},
                   ["prometheus"]) == ["prometheus-alertmanager"]



def test_a_package_an_earlier_release_dropped_from_its_record_is_ours_again():
    """The record overwrite of releases before 2026-12-05: Prometheus installed by the monitor's
    first deploy, then Alertmanager's record replaced Prometheus'. Ours exactly in that pattern
    (the role's record lists Alertmanager, the host did not have Prometheus before the first
    deploy); any other package missing from a record stays an operator's."""
    from llamadeploy.packages import lost

    have = {"prometheus": {"2.42"}, "prometheus-alertmanager": {"0.25"}}
    pkgs = ["prometheus", "prometheus-alertmanager"]
    assert lost("monitor", pkgs, have, ["prometheus-alertmanager"], ["curl"]) == ["prometheus"]
    assert lost("monitor", pkgs, have, ["prometheus-alertmanager"], ["curl", "prometheus"]) == []  # the host had it
    assert lost("monitor", pkgs, have, None, ["curl"]) == []  # this role never ran here: an operator's install
    assert lost("monitor", pkgs, have, ["prometheus-alertmanager"], None) == []  # no list of what the host had
    assert lost("monitor", pkgs, have, pkgs, ["curl"]) == []  # recorded: nothing lost
    assert lost("monitor", pkgs, {}, ["prometheus-alertmanager"], ["curl"]) == []  # not installed: installed anew
    # an Alertmanager the operator installed after a deploy without one: not the overwrite's pattern
    assert lost("monitor", pkgs, have, ["prometheus"], ["curl"]) == []
    assert lost("monitor", pkgs, have, [], ["curl"]) == []  # an empty record: nothing says which
    assert lost("front", ["haproxy"], {"haproxy": {"2.6"}}, [], ["curl"]) == []  # no such overwrite for a front
