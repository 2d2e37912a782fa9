"""The order and conditions of a role's steps, without a host: pyinfra's operation modules are
replaced by a recorder, so a role's body runs as plain Python and lists what it would add.

What matters here is what a host cannot show in one deploy: which step runs before which
(a guard started before a running service is bound to it) and which change triggers which
step (a changed guard restarted); the operations themselves have their own specs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from llamadeploy.config import HostConfig


class Op:
    """A recorded operation call; ``changed`` is what ``did_change()`` will say at execution."""

    def __init__(self, call: str, args: tuple, kwargs: dict[str, Any]):
        self.call, self.args, self.kwargs = call, args, kwargs
        self.changed = False

    def did_change(self) -> bool:
        return self.changed

    def runs(self) -> bool:
        """Whether its ``_if`` conditions hold now (as pyinfra evaluates them at execution)."""
        cond = self.kwargs.get("_if") or []
        return all(c() for c in (cond if isinstance(cond, list) else [cond]))

    def __repr__(self) -> str:
        return f"{self.call}({self.kwargs.get('name')!r})"


class Recorder:
    """Stands in for pyinfra's and our operation modules (``systemd.service(...)`` records an Op)."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def op(self, call: str) -> Callable[..., Op]:
        def record(*args: Any, **kwargs: Any) -> Op:
            self.ops.append(Op(call, args, kwargs))
            return self.ops[-1]
        return record

    def module(self, prefix: str) -> Any:
        rec = self

        class Module:
            def __getattr__(self, name: str) -> Callable[..., Op]:
                return rec.op(f"{prefix}.{name}")
        return Module()

    def find(self, call: str, **match: Any) -> Op:
        found = [o for o in self.ops if o.call == call and all(o.kwargs.get(k) == v for k, v in match.items())]
        assert len(found) == 1, (call, match, self.ops)
        return found[0]

    def index(self, op: Op) -> int:
        return next(i for i, o in enumerate(self.ops) if o is op)


@pytest.fixture
def fenced(monkeypatch) -> Recorder:
    """:func:`~llamadeploy.roles.firewall.port_fenced` for HAProxy's exporter, recorded."""
    import llamadeploy.roles.firewall as fw

    rec = Recorder()
    for name in ("atomic", "files", "server", "systemd", "packages", "units"):
        monkeypatch.setattr(fw, name, rec.module(name))
    monkeypatch.setattr(fw, "table_loaded", rec.op("table_loaded"))
    monkeypatch.setattr(fw, "refuse_foreign_fence", rec.op("refuse_foreign_fence"))
    cfg = HostConfig.model_validate({"role": "front"})
    fw.port_fenced._inner(cfg, "haproxy", "llamadeploy_haproxy_exporter",
                          "/etc/haproxy/llamadeploy-exporter.nft", 8405, ["10.0.0.9/32"], "llama_role = 'front'")
    return rec


def test_the_guard_runs_before_a_running_service_is_bound_to_it(fenced):
    """systemd stops a running service whose new ``BindsTo=`` names an inactive unit when it
    re-reads it: the guard is started before the binding drop-in is written and reloaded."""
    guard_running = fenced.find("systemd.service", service="haproxy-fence.service", running=True)
    bound = fenced.find("atomic.put", dest="/etc/systemd/system/haproxy.service.d/llamadeploy-fence.conf")
    guard_file = fenced.find("atomic.put", dest="/etc/systemd/system/haproxy-fence.service")
    assert fenced.index(guard_file) < fenced.index(guard_running) < fenced.index(bound)
    reloads = [i for i, o in enumerate(fenced.ops) if o.call == "systemd.daemon_reload"]
    # the guard's own unit is read before it starts; the binding only after it runs
    assert any(fenced.index(guard_file) < i < fenced.index(guard_running) for i in reloads)
    assert any(i > fenced.index(bound) for i in reloads)
    assert not [o for o in fenced.ops if o.call == "systemd.service" and o is not guard_running]


def test_a_fence_leaves_a_drop_in_directory_the_site_has_as_it_is(fenced):
    """Both drop-in directories a fence writes into (the host's nftables service's, the fenced
    unit's) may be the site's: made 755 when missing, their mode and owner otherwise untouched."""
    for path in ("/etc/systemd/system/nftables.service.d", "/etc/systemd/system/haproxy.service.d"):
        made = fenced.find("files.directory", path=path)
        assert made.kwargs["mode"] == "755" and made.kwargs["_no_check_owner_mode"] is True, made


def test_a_fence_checks_its_tables_name_before_it_loads_anything(fenced):
    """A table of the fence's name, or a file where it writes a drop-in, that the deploy did not
    make is refused while pyinfra prepares: the check comes before the first operation of the fence."""
    asked = fenced.find("refuse_foreign_fence")
    assert asked.args == ("llamadeploy_haproxy_exporter", "llama_role = 'front'",
                          ["/etc/systemd/system/nftables.service.d/llamadeploy_haproxy_exporter.conf",
                           "/etc/systemd/system/haproxy.service.d/llamadeploy-fence.conf"])
    assert fenced.index(asked) < fenced.index(fenced.find("table_loaded"))
    assert all(fenced.index(asked) < fenced.index(o) for o in fenced.ops if o.call.startswith(("atomic.", "files.")))


@pytest.mark.parametrize(("comment", "refused"), [
    (None, False),  # no table of that name
    ("llamadeploy 0123456789abcdef", False),  # the deploy's (a server's fence)
    ("llamadeploy rpc 50052 10.0.0.1", False),  # the deploy's (an RPC worker's)
    ("site firewall", True),
    ("", True),  # a table without a comment
])
def test_a_table_without_the_deploys_mark_is_refused(monkeypatch, comment, refused):
    from pyinfra.api import DeployError

    import llamadeploy.roles.firewall as fw

    monkeypatch.setattr(fw, "host", type("H", (), {"name": "h1", "get_fact": lambda self, fact, **kw: comment})())
    if not refused:
        fw.refuse_foreign_table("llamadeploy_llama_server", "llama_server.allow_from")
        return
    with pytest.raises(DeployError) as err:
        fw.refuse_foreign_table("llamadeploy_llama_server", "llama_server.allow_from")
    assert str(err.value).startswith(
        "preflight refused host h1: llama_server.allow_from: this host already has nftables table inet "
        f"llamadeploy_llama_server, which this deploy did not create (its comment {comment!r} lacks 'llamadeploy'")


@pytest.mark.parametrize(("first", "theirs"), [
    (None, False),  # no file there
    ("", False),  # an empty one: nothing in it to lose
    ("# Managed by llamadeploy (pyinfra). Local edits are overwritten on the next deploy.", False),
    ("# site policy: log every firewall load", True),
    ("[Service]", True),  # the header anywhere but the first line is not ours
])
def test_a_dropin_without_the_deploys_header_is_refused(monkeypatch, first, theirs):
    from pyinfra.api import DeployError

    import llamadeploy.roles.firewall as fw

    path = "/etc/systemd/system/nftables.service.d/llamadeploy_llama_server.conf"
    found = {} if first is None else {path: first}
    asked: list[str] = []

    class Inventory:  # (weak-referenceable, as pyinfra's is)
        pass

    class Host:
        name, inventory = "h1", Inventory()

        def get_fact(self, fact, **kw):
            asked.append(fact.__name__)
            return {"NftTableComment": None, "FirstLines": found}[fact.__name__]

    monkeypatch.setattr(fw, "host", Host())
    assert fw.foreign_dropins({**found, "/other.conf": "# Managed by llamadeploy"}) == ([path] if theirs else [])
    if not theirs:
        fw.refuse_foreign_fence("llamadeploy_llama_server", "llama_server.allow_from", [path])
        fw.refuse_foreign_fence("llamadeploy_llama_server", "this deploy's fallback to release r1", [path])
        assert asked == ["NftTableComment", "FirstLines"]  # checked once per run: the fallback's is the same
        return
    with pytest.raises(DeployError) as err:
        fw.refuse_foreign_fence("llamadeploy_llama_server", "llama_server.allow_from", [path])
    assert str(err.value).startswith(
        f"preflight refused host h1: llama_server.allow_from: this host already has {path}, a drop-in this deploy "
        "did not create (its first line is not '# Managed by llamadeploy'")


@pytest.mark.parametrize(("changed", "started", "restarted"), [
    ("guard", False, True),
    ("dropin", False, True),
    (None, False, False),
    ("guard", True, False),  # just started: it runs the new definition already
])
def test_a_changed_guard_is_restarted_alone(fenced, changed, started, restarted):
    """Nothing restarts HAProxy or Prometheus when their guard's definition changes, so the guard
    is restarted itself; without its requirements, which would restart the bound service too."""
    guard_file = fenced.find("atomic.put", dest="/etc/systemd/system/haproxy-fence.service")
    dropin = fenced.find("atomic.put", dest="/etc/systemd/system/nftables.service.d/llamadeploy_haproxy_exporter.conf")
    guard_running = fenced.find("systemd.service", service="haproxy-fence.service", running=True)
    restart = fenced.find("server.shell", commands=[
        "systemctl restart --job-mode=ignore-requirements haproxy-fence.service"])
    bound = fenced.find("atomic.put", dest="/etc/systemd/system/haproxy.service.d/llamadeploy-fence.conf")
    assert fenced.index(guard_running) < fenced.index(restart) < fenced.index(bound)
    guard_file.changed, dropin.changed = changed == "guard", changed == "dropin"
    guard_running.changed = started
    assert restart.runs() is restarted


@pytest.mark.parametrize(("role", "removed"), [("front", True), ("monitor", True), ("server", False),
                                                ("rpc_worker", False)])
def test_a_host_that_becomes_a_front_or_a_monitor_loses_its_rpc_worker(monkeypatch, role, removed):
    """A former RPC worker's unit, fence and guard go whatever its new role; a server's go in
    ``rpc.group_step`` (part of the server's steps), a front's and a monitor's in the deploy."""
    import llamadeploy.deploy as d
    from llamadeploy.roles import front, monitor, rpc

    calls: list[str] = []
    monkeypatch.setattr(rpc, "worker_removed", lambda name: calls.append(f"worker_removed {name}"))
    monkeypatch.setattr(front, "front_door", lambda cfg: calls.append("front_door"))
    monkeypatch.setattr(front, "served", lambda cfg, changed: None)
    monkeypatch.setattr(monitor, "monitor", lambda cfg: calls.append("monitor"))
    monkeypatch.setattr(d, "_server", lambda cfg: calls.append("server steps"))
    monkeypatch.setattr(d, "_locked", lambda cfg, action: None)  # the lock needs a connected host
    monkeypatch.setattr(d, "platform_checked", lambda: None)  # so does the operating system's fact
    monkeypatch.setattr(d, "ports_checked", lambda cfg: None)  # and the ports' holders
    host_metrics: list[str] = []  # every role gets its host metrics (a node exporter, when there is a monitor)
    monkeypatch.setattr(d.node_exporter, "host_metrics", lambda cfg: host_metrics.append(cfg.role))
    gpu_metrics: list[bool] = []  # a front or monitor is no CUDA server: its GPU metrics timer goes too
    monkeypatch.setattr(d.node_exporter, "gpu_metrics", lambda cfg, on_gpu_host: gpu_metrics.append(on_gpu_host))
    monkeypatch.setattr(d.node_exporter, "wanted", lambda cfg: False)  # no inventory here
    # a front's and a monitor's ownership record, first (a server's comes with its model files)
    records: list[list[str]] = []
    monkeypatch.setattr(d.ownership, "owned", lambda cfg, placed=(), fixed=(): (calls.append("owned"),
                                                                               records.append(list(fixed))))
    cfg = HostConfig.model_validate({"role": role} if role in ("front", "monitor") else {
        "role": role, "model": {"path": "/m.gguf"}, "server": {"allow_unauthenticated": True}})
    d.llama_server._inner(cfg)
    assert ("worker_removed RPC worker" in calls) is removed
    assert host_metrics == [role]
    assert gpu_metrics == ([False] if removed else [])
    if removed:  # the record first, then the worker goes, before the role's own steps
        assert calls[:3] == ["owned", "worker_removed RPC worker", role.replace("front", "front_door")]
        assert records == [(front if role == "front" else monitor).owned_entries(cfg)]
    else:
        assert "owned" not in calls


@pytest.mark.parametrize(("installed", "args", "config", "restart", "reload"), [
    (True, True, True, False, True),  # first install: its postinst started it with the arguments in place
    (False, True, True, True, False),  # new arguments later: a restart (which reads the config too)
    (False, False, True, False, True),  # a new config: a reload
    (False, False, False, False, False),
])
def test_alertmanager_checks_its_config_and_is_not_restarted_after_its_first_start(
        monkeypatch, installed, args, config, restart, reload):
    """``amtool check-config`` checks the staged config before it replaces the running one; the
    arguments are written before the package, so the postinst's start is the only one."""
    import llamadeploy.roles.monitor as mon

    rec = Recorder()
    for name in ("atomic", "files", "systemd", "packages"):
        monkeypatch.setattr(mon, name, rec.module(name))
    cfg = HostConfig.model_validate({"role": "monitor",
                                     "monitor": {"alertmanager": {"webhook": {"url": "https://h.example.com/x"}}}})
    assert mon.alertmanager(cfg) is True
    conf = rec.find("atomic.put", dest=mon.AM_CONFIG)
    assert conf.kwargs["check"] == "amtool check-config {path} >/dev/null"
    arguments = rec.find("atomic.put", dest=mon.AM_DEFAULTS)
    package = rec.find("packages.installed", packages=["prometheus-alertmanager"])
    assert rec.index(arguments) < rec.index(package) < rec.index(conf)
    package.changed, arguments.changed, conf.changed = installed, args, config
    assert rec.find("systemd.service", restarted=True).runs() is restart
    assert rec.find("systemd.service", reloaded=True).runs() is reload
    rec.find("systemd.service", running=True).changed = True  # started by this run: neither
    assert not rec.find("systemd.service", restarted=True).runs()
    assert not rec.find("systemd.service", reloaded=True).runs()


class UnitsSaying:
    """``llamadeploy.units`` as a host answers it: whether a unit of that name is someone else's."""

    def __init__(self, theirs: bool):
        self.theirs, self.asked = theirs, []

    def left_alone(self, unit: str) -> bool:
        self.asked.append(unit)
        return self.theirs


@pytest.mark.parametrize("theirs", [False, True])
def test_an_rpc_worker_unit_and_a_fence_guard_that_are_not_ours_are_neither_stopped_nor_removed(monkeypatch, theirs):
    """A server's every deploy (and uninstall) removes a former RPC worker's unit and its fence's
    guard; an operator's own ``ggml-rpc-server.service`` (one run by hand) stays, running."""
    import llamadeploy.roles.firewall as fw
    from llamadeploy.roles import rpc

    rec = Recorder()
    said = UnitsSaying(theirs)
    for mod in (rpc, fw):
        for name in ("files", "server", "systemd"):
            monkeypatch.setattr(mod, name, rec.module(name))
        monkeypatch.setattr(mod, "units", said)
        monkeypatch.setattr(mod, "host", type("H", (), {"get_fact": lambda self, fact, **kw: True})())
    monkeypatch.setattr(rpc, "table_removed", rec.op("table_removed"))
    monkeypatch.setattr(fw, "dropin_removed", rec.op("dropin_removed"))
    rpc.worker_removed("RPC worker")
    assert said.asked == ["ggml-rpc-server.service", "ggml-rpc-server-fence.service"]
    touched = [o for o in rec.ops if o.call in ("files.file", "server.shell")]
    unit_ops = [o for o in touched if "ggml-rpc-server.service" in repr(o.kwargs)]
    guard_ops = [o for o in touched if "ggml-rpc-server-fence.service" in repr(o.kwargs)]
    assert (unit_ops == []) is theirs and (guard_ops == []) is theirs, rec.ops
    if not theirs:
        assert {o.kwargs["commands"][0] for o in unit_ops + guard_ops if o.call == "server.shell"} == {
            "systemctl disable --now ggml-rpc-server.service", "systemctl stop ggml-rpc-server-fence.service"}
    # the fence's own parts are named for the deploy (llamadeploy_*): asked to go either way, and
    # each goes only when it carries the deploy's mark (a header, a table comment: their operations)
    rec.find("dropin_removed", path="/etc/systemd/system/nftables.service.d/llamadeploy_rpc.conf")
    rec.find("table_removed", table="llamadeploy_rpc")


@pytest.mark.parametrize(("mode", "recorded", "owner"), [
    ("native", True, ("llama", "llama")),
    ("docker", True, ("nobody", "nogroup")),  # the container's user reads the key
    ("native", False, None),  # a new release: release_recorded copies both whole
])
def test_a_recorded_release_keeps_the_key_and_rules_it_serves_with(monkeypatch, mode, recorded, owner):
    """A deploy of a release recorded before (a rotated key, other allow_from networks under the
    same release id) copies what serves now into its record, so that a later rollback or fallback
    never brings back a key rotated away from or a fence's old networks."""
    import llamadeploy.roles.release as rel

    rec = Recorder()
    monkeypatch.setattr(rel, "secret_copied", rec.op("secret_copied"))
    monkeypatch.setattr(rel, "copied", rec.op("copied"))
    records = [type("R", (), {"id": "r1"})(), type("R", (), {"id": "r2"})()] if recorded else []
    monkeypatch.setattr(rel, "host", type("H", (), {"name": "h1", "get_fact": lambda self, fact, **kw: records})())
    cfg = HostConfig.model_validate({"mode": mode, "model": {"path": "/m.gguf"}, "server": {"host": "127.0.0.1"}})
    served = {rel.KEY_FILE: "/etc/llama-server/api-key", rel.RULES_FILE: "/etc/llama-server/firewall.nft"}
    rel._record_refreshed(cfg, "r2", served)
    if not recorded:
        assert rec.ops == []
        return
    entry = f"{rel.records_dir(cfg)}/r2"
    key = rec.find("secret_copied")
    assert (key.kwargs["src"], key.kwargs["dest"]) == ("/etc/llama-server/api-key", f"{entry}/{rel.KEY_FILE}")
    assert (key.kwargs["user"], key.kwargs["group"]) == owner
    rules = rec.find("copied")
    assert (rules.kwargs["src"], rules.kwargs["dest"], rules.kwargs["mode"]) == (
        "/etc/llama-server/firewall.nft", f"{entry}/{rel.RULES_FILE}", "600")
    rec.ops.clear()
    rel._record_refreshed(cfg, "r2", {})  # neither a key nor a fence: nothing to copy
    assert rec.ops == []
