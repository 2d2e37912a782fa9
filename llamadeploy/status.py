"""What runs on each host of an inventory, and how it differs from what the inventory asks for.

pyinfra does the connecting (SSH, sudo, host data); we read what the deploy
left on each host (the manifest, found through the host's own
``llama_service.config_dir``), ask systemd or Docker and ``/health``, and
compare with the host's validated settings. Used by ``llamadeploy status`` and
``llamadeploy bench --inventory``.
"""

from __future__ import annotations

import os
import posixpath
import shlex
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from llamadeploy.config import HostConfig
from llamadeploy.manifest import Manifest, manifest_path
from llamadeploy.tuning import flag_names


class HostUnreachable(Exception):
    """A command on a host failed; the message names the host and the command."""


@dataclass(frozen=True)
class Target:
    """One deployed host, as ``bench --inventory`` drives it."""

    host: str
    url: str
    api_key: str | None
    model_bytes: int
    read_bandwidth: int | None  #: bytes/s, single core


@dataclass
class ModelStatus:
    """One model of a router-mode host: what the release holds and what the router says of it."""

    alias: str
    kind: str
    sha256: str  #: prefix of its (first) file's sha256
    #: the router's status: loaded, loading, unloaded, sleeping, ... ("-" when it did not answer)
    state: str


@dataclass
class HostStatus:
    host: str
    mode: str | None = None
    release: str | None = None
    #: the release as a whole (build + model + unit), the id rollback takes; previous ones newest first
    release_id: str | None = None
    previous: list[str] = field(default_factory=list)
    model: str | None = None
    model_sha256: str | None = None
    flags_digest: str | None = None
    service: str | None = None
    health: str | None = None
    drift: list[str] = field(default_factory=list)
    #: an RPC head: its workers and whether each answers from the head; a worker: its head(s)
    rpc: str | None = None
    #: router mode: each model, with its state in the router
    models: list[ModelStatus] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def limited(hosts: Iterable[Any], limit: Sequence[str] | None) -> list[Any]:
    """The hosts ``--limit`` names, by host or group name, in their order (all without a limit)."""
    return [h for h in hosts if not limit or h.name in limit or any(g in limit for g in h.groups)]


def unknown_limits(hosts: Iterable[Any], limit: Sequence[str] | None) -> list[str]:
    """The ``--limit`` names that are neither a host nor a group of the inventory (pure)."""
    known = {n for h in hosts for n in (h.name, *h.groups)}
    return [n for n in limit or () if n not in known]


@contextmanager
def connected(path: str, log: Any = None, state_unreachable: list[str] | None = None,
              limit: Sequence[str] | None = None) -> Iterator[tuple[Any, dict[str, HostConfig]]]:
    """Load and validate the inventory, connect its hosts (``limit``: only the hosts and groups it
    names); yields (connected hosts in inventory order, configs by host).

    Every host's settings are validated, limited or not: a run never starts from an inventory
    with a bad host in it. Only the limited hosts are connected to, and ``state_unreachable``
    (optional) receives those of them that could not be: a host named by its group is reported
    like one named by itself. A limit that names nothing in the inventory is a ConfigError.
    """
    if state_unreachable is None:
        state_unreachable = []
    from pyinfra.api import Config, State
    from pyinfra.api.connect import connect_all
    from pyinfra.api.exceptions import PyinfraError
    from pyinfra.context import ctx_state
    from pyinfra_cli.inventory import make_inventory

    from llamadeploy.hostdata import ConfigError, validate_inventory

    # the same sequence as pyinfra's CLI: a state in context, the inventory, connect
    state = State()
    ctx_state.set(state)
    inventory = make_inventory(path, cwd=os.getcwd())
    configs = validate_inventory(inventory)
    unknown = unknown_limits(inventory, limit)
    if unknown:
        raise ConfigError([f"--limit {n}: no host or group of that name in {path}" for n in unknown])
    wanted = limited(inventory, limit)
    state.init(inventory, Config(), initial_limit=wanted if limit else None)
    if log:
        log(f"==> connecting to {len(wanted)} host(s)")
    try:
        connect_all(state)  # the limited hosts only, all at once
    except PyinfraError:  # "No hosts remaining!": every host failed to connect
        pass
    active = set(inventory.get_active_hosts())
    hosts = [h for h in wanted if h in active]
    # pyinfra drops hosts it could not connect to from the active set: report them, not hide them
    state_unreachable[:] = [h.name for h in wanted if h not in active]
    try:
        yield hosts, configs
    finally:
        for host in hosts:
            host.disconnect()


def _run(host: Any, command: str) -> str:
    ok, out = host.run_shell_command(command, _sudo=host.data.get("_sudo", False))
    if not ok:
        raise HostUnreachable(f"{host.name}: `{command.split()[0]}` failed: {out.stderr.strip()[:300]}")
    return str(out.stdout)


#: the line that starts each part's output in :func:`read_parts`
PART_MARK = "@@llamadeploy-part "


def parts_command(parts: dict[str, str]) -> str:
    """One shell command running each part in a subshell of its own (an ``exit`` or a failure ends
    only that part), its output after a marker line and followed by one newline of ours (so that
    a part whose output has no newline at its end, like ``curl -w '%{http_code}'``, cannot run into
    the next marker); the whole always exits 0."""
    return "; ".join(f"echo {shlex.quote(PART_MARK + name)}; ( {cmd} ) 2>/dev/null; echo"
                     for name, cmd in parts.items()) + "; true"


def split_parts(text: str) -> dict[str, str]:
    """{part name: its output, exactly} from :func:`parts_command`'s output (pure)."""
    out: dict[str, list[str]] = {}
    lines: list[str] | None = None
    for line in text.splitlines(keepends=True):
        if line.startswith(PART_MARK):
            lines = out.setdefault(line[len(PART_MARK):].strip(), [])
        elif lines is not None:
            lines.append(line)
    return {name: "".join(lines).removesuffix("\n") for name, lines in out.items()}


def read_parts(host: Any, parts: dict[str, str]) -> dict[str, str]:
    """Several reads in one command: one SSH round trip instead of one per read (status asks
    every host the same handful of questions; each round trip is what makes it slow)."""
    got = split_parts(_run(host, parts_command(parts)))
    return {name: got.get(name, "") for name in parts}


def read_manifest(host: Any, cfg: HostConfig) -> Manifest | None:
    """The host's manifest, or None when nothing was deployed there."""
    path = manifest_path(cfg.service.config_dir)
    text = _run(host, f"cat {shlex.quote(path)} 2>/dev/null || true")
    return Manifest.parse(text) if text.strip() else None


def address(host: Any) -> str:
    return str(host.data.get("ssh_hostname") or host.name)


def inventory_targets(path: str, probe_command: str) -> list[Target]:
    """One target per deployed host of the inventory file: URL, key, model size, measured bandwidth."""
    targets = []
    with connected(path) as (hosts, configs):
        for host in hosts:
            m = read_manifest(host, configs[host.name])
            if m is None:
                raise HostUnreachable(f"{host.name}: nothing deployed ({manifest_path(configs[host.name].service.config_dir)} is missing)")
            key = _run(host, f"cat {shlex.quote(m.api_key_file)}").strip() if m.api_key_file else None
            model_dir = m.model_path.rsplit("/", 1)[0]  # on the host, in both modes
            sizes = _run(host, "stat -c %s " + " ".join(shlex.quote(f"{model_dir}/{n}") for n in m.model_files))
            probe = _run(host, probe_command).strip()
            targets.append(Target(host.name, f"http://{address(host)}:{m.port}", key,
                                  sum(int(x) for x in sizes.split()), int(probe) if probe.isdigit() else None))
    return targets


def expected_model_sha256(cfg: HostConfig, spec: Any = None) -> str | None:
    """The first model file's sha256 the inventory asks for (``spec``: one of ``llama_models``),
    without downloading anything."""
    spec = spec or cfg.model
    if spec.sha256:
        return str(spec.sha256)
    if spec.path:
        from llamadeploy.artifacts import file_sha256

        return file_sha256(spec.path)
    from llamadeploy.roles.model.source import resolve

    return resolve(spec).first.sha256


def expected_args(host: Any, cfg: HostConfig, cpu: Any = None, mem: Any = None) -> list[str] | None:
    """The argument vector a deploy would render for this host now, or None when that needs the
    model's GGUF header and only a download could give it (a Hub model outside the catalog).
    ``cpu``/``mem``: the host's CpuTopology and HostMemory facts when already read."""
    from pyinfra.context import ctx_host

    from llamadeploy.facts import CpuTopology
    from llamadeploy.roles.docker import CONTAINER_PORT, KEY_IN_CONTAINER, MODELS_IN_CONTAINER
    from llamadeploy.roles.model.source import ModelArtifact, ModelFile, default_alias
    from llamadeploy.roles.preflight import meta_for
    from llamadeploy.roles.preflight.facts import HostMemory
    from llamadeploy.tuning import plan_memory, server_args

    if cfg.router_mode:  # the router's flags are few; its models' are compared one by one (model_drift)
        return None
    if not cfg.model.path:
        # a Hub model's header is read from the downloaded file at deploy time; the catalog's values
        # or the operator's ctx_size would be a different input, hence false drift: not compared
        return None
    name = posixpath.basename(cfg.model.path)
    art = ModelArtifact((ModelFile(name, "", os.path.getsize(cfg.model.path), "", local=cfg.model.path),),
                        cfg.model.alias or default_alias(name))
    with ctx_host.use(host):
        try:
            meta = meta_for(cfg, art)
        except Exception:  # noqa: BLE001 - the header is not on the controller: no flags drift, not an error
            return None
        cpu = cpu or host.get_fact(CpuTopology)
        mem = mem or host.get_fact(HostMemory)
    if cfg.rpc.workers_group:  # an RPC head: the plan its workers' configured memory gives
        from llamadeploy.roles import rpc
        from llamadeploy.roles.rpc.plan import plan_group

        workers = rpc.members_from_config(host.inventory, cfg, host.name)
        if workers is None:
            return None
        plan = plan_group(cfg, meta, mem.usable, cpu, mem.memlock_ceiling, workers)
    else:
        plan = plan_memory(cfg, meta, mem.usable, cpu, mem.memlock_ceiling)
    if cfg.mode == "docker":
        return server_args(cfg, cpu, plan, f"{MODELS_IN_CONTAINER}/{art.first.name}", art.alias,
                           bind=("0.0.0.0", CONTAINER_PORT), key_path=KEY_IN_CONTAINER)
    return server_args(cfg, cpu, plan, f"{cfg.model_dir}/{art.first.name}", art.alias)


def drift(cfg: HostConfig, m: Manifest, expected_sha: str | None, args: list[str] | None = None) -> list[str]:
    """Where the deployed host differs from its inventory settings (pure); ``args``: the flags a
    deploy would render now (None: not known without a download)."""
    out = []
    if m.mode != cfg.mode:
        out.append(f"mode {m.mode} -> {cfg.mode}")
    if cfg.mode == "native" and m.release != cfg.build.release_key():
        out.append(f"release {m.release} -> {cfg.build.release_key()}")
    if bool(m.models) != cfg.router_mode:  # (router mode's models one by one: model_drift)
        out.append("one model -> several (router mode)" if cfg.router_mode else "several models (router mode) -> one")
    if expected_sha and not m.models and m.model_sha256 != expected_sha:
        out.append(f"model sha256 {m.model_sha256[:12]} -> {expected_sha[:12]}")
    if (m.host, m.port) != (cfg.server.host, cfg.server.port):
        out.append(f"bind {m.host}:{m.port} -> {cfg.server.host}:{cfg.server.port}")
    if bool(m.api_key_file) != (cfg.server.api_key is not None):
        out.append("api key " + ("set -> none" if m.api_key_file else "none -> set"))
    if cfg.model.alias and not cfg.router_mode and m.alias != cfg.model.alias:
        out.append(f"alias {m.alias} -> {cfg.model.alias}")
    if args is not None and args != m.args:
        changed = sorted(set(flag_names(args)) ^ set(flag_names(m.args))) or ["values"]
        out.append(f"flags {m.flags_digest()} -> {Manifest.digest(args)} ({', '.join(changed)})")
    return out


def model_drift(m: Manifest, expected: dict[str, str | None]) -> list[str]:
    """A router-mode release's models against the inventory's (alias -> first file's sha256, None
    when not known without a download): models added, removed or re-pinned (pure)."""
    out = []
    deployed = {s.alias: s for s in m.models}
    for alias in sorted(set(expected) - set(deployed)):
        out.append(f"model {alias} to be added")
    for alias in sorted(set(deployed) - set(expected)):
        out.append(f"model {alias} to be removed")
    for alias in sorted(set(expected) & set(deployed)):
        want, files = expected[alias], deployed[alias].files
        have = next(iter(files.values()), "")
        if want and have != want:
            out.append(f"model {alias} sha256 {have[:12]} -> {want[:12]}")
    return out


def router_states(reply: str) -> dict[str, str]:
    """alias -> status from the router's ``GET /models`` JSON (pure); {} when it is not that JSON."""
    import json

    try:
        data = json.loads(reply)["data"]
        return {str(e["id"]): str((e.get("status") or {}).get("value", "-")) for e in data}
    except (ValueError, KeyError, TypeError):
        return {}


def _router_models(m: Manifest, reply: str) -> list[ModelStatus]:
    """Each model of a router release with the router's word on it (``reply``: its ``/models``)."""
    states = router_states(reply)
    return [ModelStatus(s.alias, s.kind, next(iter(s.files.values()), "")[:12], states.get(s.alias, "-"))
            for s in m.models]


def _running_reads(m: Manifest, rpc_endpoints: list[str] | None) -> dict[str, str]:
    """What to ask about the release the manifest names, where it runs now (not where the
    inventory would move it): its service, its health, a router's models, an RPC head's workers
    (``rpc_endpoints``: None on a host that is no head)."""
    from llamadeploy.roles.health import health_url
    from llamadeploy.roles.rpc.facts import RpcReachable

    q = shlex.quote
    reads = {}
    if m.mode == "native":
        reads["service"] = f"systemctl is-active {q(m.unit or '')}"
    else:
        label = q(f"label=com.docker.compose.service={m.compose_service}")
        reads["service"] = f"docker ps --filter {label} --format '{{{{.Status}}}}'"
    reads["health"] = f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 {q(health_url(m.host, m.port))}"
    if m.models:
        key = (f"{{ printf 'Authorization: Bearer '; cat {q(m.api_key_file)}; }}" if m.api_key_file
               else "printf ''")
        reads["models"] = f"{key} | curl -s --max-time 5 -H @- {q(health_url(m.host, m.port, '/models'))}"
    if rpc_endpoints is not None:
        reads["rpc"] = RpcReachable().command(rpc_endpoints)
    return reads


def host_status(host: Any, cfg: HostConfig) -> HostStatus:
    """One host's row: what runs, whether it is healthy, and its drift.

    Two round trips, whatever the host runs: what the deploy left (manifest, release records,
    the CPU and memory facts the flags are planned from), then the running release's service,
    health and, where it has them, models and RPC workers."""
    from llamadeploy.facts import CpuTopology
    from llamadeploy.roles.preflight.facts import HostMemory
    from llamadeploy.roles.release import records_dir
    from llamadeploy.roles.release.facts import ReleaseRecords

    st = HostStatus(host.name)
    if cfg.role == "rpc_worker":
        return _worker_status(host, cfg, st)
    try:
        records, cpu, mem = ReleaseRecords(), CpuTopology(), HostMemory()
        left = read_parts(host, {"manifest": f"cat {shlex.quote(manifest_path(cfg.service.config_dir))}",
                                 "records": records.command(records_dir(cfg)),
                                 "cpu": cpu.command(), "mem": mem.command()})
        if not left["manifest"].strip():
            st.error = "nothing deployed"
            st.drift = ["not deployed"]
            return st
        m = Manifest.parse(left["manifest"])
        st.mode, st.release, st.release_id = m.mode, m.release or m.image, m.release_id
        st.previous = [r.id for r in reversed(records.process(left["records"].splitlines())) if r.id != m.release_id]
        st.model, st.model_sha256 = m.alias, m.model_sha256[:12]
        if m.models:
            st.model, st.model_sha256 = ",".join(s.alias for s in m.models), None
        st.flags_digest = m.flags_digest()
        eps = None
        if cfg.rpc.workers_group:
            from llamadeploy.roles import rpc

            eps = [rpc.endpoint(wcfg, w) for w, wcfg in rpc.workers_of(host.inventory, cfg, host.name)]
        now = read_parts(host, _running_reads(m, eps))
        st.service = now["service"].strip() or ("not running" if m.mode == "docker" else "unknown")
        code = now["health"].strip()
        st.health = "ok" if code == "200" else f"HTTP {code or 'no answer'}"
        if m.models:
            st.models = _router_models(m, now["models"])
            st.drift = drift(cfg, m, None)
            if cfg.router_mode:
                st.drift += model_drift(m, {e.alias: expected_model_sha256(cfg, e) for e in cfg.models})
        else:
            st.drift = drift(cfg, m, expected_model_sha256(cfg),
                             expected_args(host, cfg, cpu.process(left["cpu"].splitlines()),
                                           mem.process(left["mem"].splitlines())))
        if eps is not None:
            from llamadeploy.roles.rpc.facts import RpcReachable

            _head_status(st, eps, RpcReachable().process(now["rpc"].splitlines()))
    except (HostUnreachable, ValueError, RuntimeError) as exc:  # ValueError: a manifest it cannot parse
        st.error = str(exc).splitlines()[0]
    except Exception as exc:  # noqa: BLE001 - one bad host (a Hub error resolving its model) is one row
        st.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return st


def _head_status(st: HostStatus, eps: list[str], up: dict[str, bool]) -> None:
    """The head's workers, each checked from the head (the only address their fences admit)."""
    st.rpc = ",".join(f"{ep}={'up' if up.get(ep) else 'DOWN'}" for ep in eps)
    down = [ep for ep in eps if not up.get(ep)]
    if down:
        st.health = f"{st.health}; RPC worker {', '.join(down)} unreachable from the head"


def _worker_status(host: Any, cfg: HostConfig, st: HostStatus) -> HostStatus:
    from llamadeploy.roles import rpc

    st.mode = "rpc_worker"
    try:
        now = read_parts(host, {"current": f"readlink {shlex.quote(cfg.current_link)}",
                                "service": f"systemctl is-active {rpc.UNIT}"})
        st.release = posixpath.basename(now["current"].strip()) or None
        st.service = now["service"].strip()
        st.rpc = "worker-of:" + (",".join(h.name for h in rpc.heads_of(host.inventory, host.name)) or "none")
        if st.release != cfg.build.release_key():
            st.drift.append(f"release {st.release} (the deploy would run {cfg.build.release_key()})")
        st.health = "ok" if st.service == "active" else "not running"
    except (HostUnreachable, RuntimeError) as exc:
        st.error = str(exc).splitlines()[0]
    return st


def fleet_status(path: str, log: Any = None, limit: Sequence[str] | None = None) -> list[HostStatus]:
    """One row per inventory host (or per host ``limit`` names), in inventory order; an
    unreachable host is a row with its error. The hosts are asked at once, each on its own
    greenlet of pyinfra's pool: ten hosts take about as long as one."""
    unreachable: list[str] = []
    with connected(path, log, unreachable, limit) as (hosts, configs):
        return _rows(hosts, configs, unreachable)


def _rows(hosts: list[Any], configs: dict[str, HostConfig], unreachable: list[str]) -> list[HostStatus]:
    from pyinfra.context import ctx_state

    pool = ctx_state.get().pool
    asked = {h.name: pool.spawn(host_status, h, configs[h.name]) for h in hosts}
    rows = {name: greenlet.get() for name, greenlet in asked.items()}
    rows |= {name: HostStatus(name, error="unreachable over SSH (see pyinfra's connect error above)")
             for name in unreachable}
    return [rows[name] for name in configs if name in rows]


def watch(path: str, draw: Callable[[list[HostStatus]], object], interval: float = 2.0,
          limit: Sequence[str] | None = None, log: Any = None, stopped: Callable[[], bool] = lambda: False,
          rounds: int | None = None) -> None:
    """Draw the fleet's rows every ``interval`` seconds until ``stopped`` (the CLI's Ctrl-C) or
    ``rounds`` draws, on the same connections: a round costs two round trips per host, not a
    reconnect. A host that stops answering becomes a row with its error; the others go on."""
    import time

    unreachable: list[str] = []
    with connected(path, log, unreachable, limit) as (hosts, configs):
        done = 0
        while not stopped() and (rounds is None or done < rounds):
            started = time.monotonic()
            draw(_rows(hosts, configs, unreachable))
            done += 1
            while not stopped() and (rounds is None or done < rounds) and time.monotonic() - started < interval:
                time.sleep(0.1)


COLUMNS = ("host", "mode", "release", "release_id", "previous", "model", "model_sha256", "flags_digest", "service",
           "health", "rpc", "drift")


def columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows as fixed-width columns two spaces apart; the last column is not padded (pure)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]).rstrip()
                     for row in rows)


def format_table(rows: list[HostStatus]) -> str:
    """A fixed-width table, one host per line; drift ``-`` means the host matches its inventory."""
    cells = [list(COLUMNS)]
    for r in rows:
        d = r.as_dict()
        d["drift"] = "; ".join(r.drift) or "-"
        d["previous"] = ",".join(r.previous) or None
        if r.error:
            d["health"] = r.error
        cells.append([str(d[c]) if d[c] is not None else "-" for c in COLUMNS])
    table = columns(cells)
    routed = [(r.host, s) for r in rows for s in r.models]
    if not routed:
        return table
    return table + "\n\nmodels (router mode)\n" + columns(
        [("host", "model", "kind", "sha256", "state"), *((h, s.alias, s.kind, s.sha256, s.state) for h, s in routed)])
