"""``llamadeploy``: the operator's command around the deploy.

    llamadeploy sandbox up [NAME --index N] [--docker] [--distro D] [--deploy]   a throwaway local host
    llamadeploy sandbox down [NAME ...]                             remove sandbox hosts
    llamadeploy sandbox ssh-config                                  ssh_config for them
    llamadeploy status INVENTORY [--json] [--limit HOST] [--watch [S]]   what runs where, drift
    llamadeploy bench --url URL | --inventory INVENTORY ...         load a deployed host
    llamadeploy key new FILE [--rotate]                             a site's API key (0600)
    llamadeploy rollout INVENTORY [--batch N|P%] [--max-unavailable N|P%]   canary, batches, gates
    llamadeploy rollback INVENTORY [--to RELEASE] [--limit HOST]    reinstate a kept release
    llamadeploy logs INVENTORY [--limit HOST] [--since T] [--grep RE] [-n N] [-f]   the fleet's journals
    llamadeploy lock status|release INVENTORY [--limit HOST] [--force]   the deploy lock
    llamadeploy dashboards export DIR --inventory INVENTORY | --prometheus-url URL   Grafana files
    llamadeploy audit INVENTORY [--limit HOST] [-n N]                   who changed what, newest first

Deploying stays ``pyinfra INVENTORY deploy.py`` (or, from an installed wheel,
``pyinfra INVENTORY llamadeploy.deploy.llama_server``). Errors are one line
naming the host, the field and the fix; the exit code is non-zero. Every run that changes
hosts holds their deploy lock (``llamadeploy.lock``): a second one is refused, naming the
holder, or waits with ``--lock-wait SECONDS`` (plain pyinfra: ``LLAMADEPLOY_LOCK_WAIT``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamadeploy.sandbox.host import DEFAULT_DISTRO, DISTROS


def _sandbox(a: argparse.Namespace) -> int:
    from llamadeploy import sandbox

    if os.geteuid() != 0:
        print("llamadeploy sandbox needs root (systemd-nspawn, veth, iptables)", file=sys.stderr)
        return 2
    if a.action == "ssh-config":
        print(sandbox.ssh_config())
        return 0
    if a.action == "down":
        stopped = sandbox.down(a.names or None)
        print(f"==> stopped and removed: {', '.join(stopped) or 'nothing was running'}")
        return 0
    name = a.names[0] if a.names else "demo"
    try:
        box = sandbox.host(name, a.index, docker=a.docker, distro=a.distro)
    except ValueError as exc:
        print(f"llamadeploy sandbox up: {exc}", file=sys.stderr)
        return 2
    inventory = sandbox.up(box, Path(a.inventory) if a.inventory else None,
                           log=lambda msg: print(msg, flush=True))
    print(f"==> inventory: {inventory}", flush=True)
    if not a.deploy:
        print(f"==> {box.name} is up; deploy with: pyinfra {inventory} deploy.py")
        print(box.address)  # last line: the address alone, for scripts (molecule's create.yml)
        return 0
    print("==> pyinfra deploy (the first run builds llama.cpp: ~5-10 min on 2 cores)", flush=True)
    deploy_file = Path("deploy.py") if Path("deploy.py").is_file() else None
    rc = sandbox.deploy(inventory, deploy_file)
    if rc != 0:
        print(f"deploy failed (rc={rc}); the host is still up for inspection: llamadeploy sandbox down {box.name}")
        return rc
    print(sandbox_howto(box.address, inventory, box.name))
    return 0


def sandbox_howto(address: str, inventory: Path, name: str) -> str:
    """What the quickstart prints: commands that work as printed, from the repository root."""
    from llamadeploy.sandbox import ssh_config

    return f"""
==> {name} serves the OpenAI chat API. Try:

curl -s http://{address}:8080/v1/chat/completions \\
  -H 'Content-Type: application/json' \\
  -d '{{"messages": [{{"role": "user", "content": "Say hello"}}], "max_tokens": 32}}'

Health, models, metrics: http://{address}:8080/health  /v1/models  /metrics
Status and drift:        .venv/bin/llamadeploy status {inventory}
Re-deploy (no changes):  .venv/bin/pyinfra -y {inventory} deploy.py
Check it:                .venv/bin/pytest tests/testinfra --hosts=ssh://root@{address} --ssh-config={ssh_config()}
Remove it:               .venv/bin/llamadeploy sandbox down {name}
"""


def _refuses_bad_settings(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command over an inventory exits 2 with the settings' one message when a host's settings
    are invalid (or ``--limit`` names nothing), before it connects to any host."""
    @functools.wraps(command)
    def run(a: argparse.Namespace) -> int:
        from llamadeploy.hostdata import ConfigError

        try:
            return command(a)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
    return run


def _seconds(text: str) -> float:
    """A positive number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive number of seconds")
    return value


def _stop_flag() -> Callable[[], bool]:
    """True once SIGINT (Ctrl-C) or SIGTERM (a supervisor) arrived: a following command ends between
    two reads, never inside pyinfra's SSH I/O (an exception there can hang the disconnect)."""
    import signal

    stop: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    return lambda: bool(stop)


@_refuses_bad_settings
def _status(a: argparse.Namespace) -> int:
    from llamadeploy.status import fleet_status, format_table, watch

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def shown(rows: list[Any]) -> str:
        return json.dumps([r.as_dict() for r in rows], indent=None if a.watch else 2) if a.json else format_table(rows)

    if a.watch:
        def draw(rows: list[Any]) -> None:
            import datetime

            if sys.stdout.isatty() and not a.json:
                print("\033[H\033[2J", end="")  # the table in place, as watch(1) draws it
            if not a.json:
                stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
                print(f"{stamp}  every {a.watch:g}s, Ctrl-C ends")
            print(shown(rows), flush=True)

        watch(a.inventory, draw, interval=a.watch, limit=a.limit, log=log, stopped=_stop_flag())
        return 0
    rows = fleet_status(a.inventory, log=log, limit=a.limit)
    print(shown(rows))
    return 1 if any(r.error or r.health != "ok" for r in rows) else 0


def _terminate_as_interrupt() -> None:
    """A SIGTERM (a supervisor, ``kill``, a CI job's timeout) ends a rollout as Ctrl-C does: its
    ``finally`` re-enables the hosts it drained and its lock is released. Python's default for
    SIGTERM is to die at once, which leaves both to the operator (``lock release``, the next
    rollout), as a SIGKILL must."""
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _fleet_run(run: Any, refused: tuple[type[Exception], ...], action: str, a: argparse.Namespace) -> int:
    """A rollout or rollback under the fleet's lock: progress on stderr, the host table on stdout;
    2 when refused up front (settings, or the lock held by another run)."""
    from llamadeploy.lock import LockHeld, fleet_held
    from llamadeploy.rollout import format_table

    def log(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    caught: tuple[type[Exception], ...] = (LockHeld, *refused)
    _terminate_as_interrupt()
    try:
        with fleet_held(a.inventory, action, wait=a.lock_wait, log=log):
            result = run(log)
    except caught as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        log(f"==> {action} interrupted: what it drained is enabled again, its lock released")
        return 130
    print(format_table(result.rows))
    return 0 if result.ok else 1


def _rollout(a: argparse.Namespace) -> int:
    from llamadeploy.hostdata import ConfigError
    from llamadeploy.rollout import rollout

    return _fleet_run(lambda log: rollout(a.inventory, batch=a.batch, max_unavailable=a.max_unavailable,
                                          canary_group=a.canary_group, log=log), (ConfigError, ValueError),
                      "rollout", a)


def _rollback(a: argparse.Namespace) -> int:
    from llamadeploy.hostdata import ConfigError
    from llamadeploy.rollout import rollback

    return _fleet_run(lambda log: rollback(a.inventory, to=a.to, limit=a.limit, log=log), (ConfigError,),
                      "rollback", a)


@_refuses_bad_settings
def _lock(a: argparse.Namespace) -> int:
    from llamadeploy.lock import fleet_release, fleet_status, format_status

    if a.action == "status":
        rows = fleet_status(a.inventory, a.limit)
        print(format_status(rows))
        return 1 if any(problem for _, _, problem in rows) else 0
    return fleet_release(a.inventory, a.limit, force=a.force)


@_refuses_bad_settings
def _audit(a: argparse.Namespace) -> int:
    from llamadeploy.audit import show

    return show(a.inventory, a.limit, lines=a.lines, err=lambda m: print(m, file=sys.stderr, flush=True))


@_refuses_bad_settings
def _logs(a: argparse.Namespace) -> int:
    """Journal lines on stdout as they are merged; problems (a host not read) on stderr."""
    from llamadeploy.logs import stream

    return stream(a.inventory, limit=a.limit, since=a.since, grep=a.grep, lines=a.lines, follow=a.follow,
                  stopped=_stop_flag() if a.follow else (lambda: False),
                  out=lambda line: print(line, flush=True),
                  err=lambda msg: print(msg, file=sys.stderr, flush=True))


@_refuses_bad_settings
def _dashboards(a: argparse.Namespace) -> int:
    """Dashboards and provisioning files; the datasource is the inventory's monitor (read, not
    connected to) or the URL given."""
    from llamadeploy import dashboards

    url = a.prometheus_url or monitor_url(a.inventory)
    if url is None:
        print(f"llamadeploy dashboards: {a.inventory} has no monitor host (llama_role 'monitor'); "
              "give --prometheus-url", file=sys.stderr)
        return 2
    for path in dashboards.export(Path(a.dir), url, a.grafana_path):
        print(path)
    return 0


def monitor_url(inventory_path: str) -> str | None:
    """``http://ADDRESS:PORT`` of the inventory's first monitor host, as Prometheus binds it."""
    from pyinfra.api import State
    from pyinfra.context import ctx_state
    from pyinfra_cli.inventory import make_inventory

    from llamadeploy.hostdata import validate_inventory
    from llamadeploy.roles.monitor import listen_address

    ctx_state.set(State())
    inventory = make_inventory(inventory_path, cwd=os.getcwd())
    configs = validate_inventory(inventory)
    for h in inventory:
        if configs[h.name].role == "monitor":
            return f"http://{listen_address(configs[h.name], h)}"
    return None


def _key(a: argparse.Namespace) -> int:
    """Write a new random API key to a 0600 controller file; refuse to replace one unless rotating."""
    import secrets

    path = Path(a.file)
    if path.exists() and not a.rotate:
        print(f"{path} exists; deploys reuse it. Replace it with: llamadeploy key new {path} --rotate",
              file=sys.stderr)
        return 1
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"sk-{secrets.token_urlsafe(32)}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    print(f"{'rotated' if a.rotate else 'wrote'} {path} (0600); with llama_server.api_key_file = {str(path)!r} "
          "the next deploy puts it on the hosts and restarts them")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # bench owns its options
        from llamadeploy.bench import main as bench_main

        return bench_main(argv[1:])
    p = argparse.ArgumentParser(prog="llamadeploy", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sb = sub.add_parser("sandbox", help="throwaway local systemd hosts (root)")
    sb.add_argument("action", choices=["up", "down", "ssh-config"])
    sb.add_argument("names", nargs="*", help="host name(s); up: default 'demo'; down: default all")
    sb.add_argument("--index", type=int, help="1-250: the host's network 10.231.<index>.0/30 (demo: 200)")
    sb.add_argument("--docker", action="store_true", help="boot with what Docker needs inside")
    sb.add_argument("--distro", choices=DISTROS, default=DEFAULT_DISTRO,
                    help=f"the host's Debian release (default {DEFAULT_DISTRO})")
    sb.add_argument("--inventory", help="the host's pyinfra inventory: used as is when it exists, else written there")
    sb.add_argument("--deploy", action="store_true", help="then deploy onto it and print how to call it")
    st = sub.add_parser("status", help="per host: release, model, flags, service, health, drift")
    st.add_argument("inventory")
    st.add_argument("--json", action="store_true")
    st.add_argument("--limit", action="append", help="only these hosts or groups (repeatable)")
    st.add_argument("--watch", type=_seconds, nargs="?", const=2.0, metavar="SECONDS",
                    help="re-draw the table every SECONDS (default 2) until Ctrl-C")
    sub.add_parser("bench", help="load a deployed host (see llamadeploy bench --help)")
    kp = sub.add_parser("key", help="a site's API key on the controller")
    kp.add_argument("action", choices=["new"])
    kp.add_argument("file", help="controller file for the key (written 0600)")
    kp.add_argument("--rotate", action="store_true", help="replace an existing key; deploy afterwards")
    ro = sub.add_parser("rollout", help="canary, then batches; each host gated, a failed one rolled back")
    ro.add_argument("inventory")
    ro.add_argument("--batch", default="1", help="hosts per batch: a count or a percentage (default 1)")
    ro.add_argument("--max-unavailable", help="at most this many hosts (count or %%) switching at once")
    ro.add_argument("--canary-group", default="canary", help="inventory group that goes first (default: canary)")
    ro.add_argument("--lock-wait", type=float, default=0.0, metavar="SECONDS",
                    help="wait this long for another run's deploy lock (default: refuse at once)")
    rb = sub.add_parser("rollback", help="reinstate each host's previous release (or --to ID); no transfer, no compile")
    rb.add_argument("inventory")
    rb.add_argument("--to", help="a release id (llamadeploy status shows them)")
    rb.add_argument("--limit", action="append", help="only these hosts (repeatable)")
    rb.add_argument("--lock-wait", type=float, default=0.0, metavar="SECONDS",
                    help="wait this long for another run's deploy lock (default: refuse at once)")
    lg = sub.add_parser("logs", help="llama-server, HAProxy and Prometheus journals of the fleet, merged by time")
    lg.add_argument("inventory")
    lg.add_argument("--limit", action="append", help="only these hosts or groups (repeatable)")
    lg.add_argument("--since", help="journalctl's --since: '1h ago', '2026-12-03 10:00', 'today'")
    lg.add_argument("--grep", help="journalctl's --grep (PCRE2; case-insensitive unless it has a capital)")
    lg.add_argument("-n", "--lines", type=int, help="the last N lines per host (default 100, or all since --since)")
    lg.add_argument("-f", "--follow", action="store_true", help="then print new lines until stopped (Ctrl-C)")
    lk = sub.add_parser("lock", help="the fleet's deploy lock: who holds it; release one a dead run left")
    lk.add_argument("action", choices=["status", "release"])
    lk.add_argument("inventory")
    lk.add_argument("--limit", action="append", help="only these hosts or groups (repeatable)")
    lk.add_argument("--force", action="store_true", help="release: also a lock whose run may still be alive")
    au = sub.add_parser("audit", help="each host's audit trail (who ran what, release before and after), newest first")
    au.add_argument("inventory")
    au.add_argument("--limit", action="append", help="only these hosts or groups (repeatable)")
    au.add_argument("-n", "--lines", type=int, default=50, help="the last N runs per host (default 50)")
    db = sub.add_parser("dashboards", help="Grafana dashboards and provisioning files for the fleet")
    db.add_argument("action", choices=["export"])
    db.add_argument("dir", help="where to write dashboards/ and provisioning/")
    src = db.add_mutually_exclusive_group(required=True)
    src.add_argument("--inventory", help="the datasource is this inventory's monitor host")
    src.add_argument("--prometheus-url", help="the datasource's URL, e.g. http://10.0.0.9:9090")
    db.add_argument("--grafana-path", help="where the dashboards will lie on the Grafana host (default: DIR/dashboards)")
    a = p.parse_args(argv)
    return {"sandbox": _sandbox, "status": _status, "key": _key, "rollout": _rollout, "rollback": _rollback,
            "logs": _logs, "lock": _lock, "audit": _audit, "dashboards": _dashboards}[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
