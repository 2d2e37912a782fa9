"""Firewall role (native mode): optional nftables rules that let only configured networks reach the port.

``llama_server.allow_from`` lists CIDRs; the role installs nftables, writes our own
table (``inet llamadeploy_<unit>``, template ``templates/firewall/llama-server.nft.j2``)
and loads it. The unit loads the same file before every start (``ExecStartPre=+nft -f``),
so after a reboot the port never opens before its rules. Other tables (the operator's
own firewall, Docker's) are never touched; without ``allow_from`` our table and file go.

A fence lives in the kernel's ruleset, which anybody may flush (``nft flush ruleset``, and
Debian's ``/etc/nftables.conf`` begins with one). So every fence (this one, an RPC worker's)
is also kept (:func:`kept`): a drop-in makes the host's ``nftables.service`` load it after its
own file, and a guard unit (``<unit>-fence.service``, which the fenced unit is bound to with
``BindsTo=``) loads it again whenever it goes, or stops the fenced service when it cannot.
"""

from __future__ import annotations

import hashlib
import ipaddress
import shlex
from collections.abc import Callable, Iterable, Mapping
from io import StringIO
from typing import Any
from weakref import WeakKeyDictionary

from pyinfra import host
from pyinfra.api import DeployError
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import File
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from llamadeploy import atomic, packages, units
from llamadeploy.config import HostConfig
from llamadeploy.render import render
from llamadeploy.roledeploy import role
from llamadeploy.roles.firewall.facts import FirstLines, NftTableComment
from llamadeploy.roles.firewall.operations import MARK, dropin_removed, is_ours, table_loaded, table_removed
from llamadeploy.tuning import systemd_quote
from llamadeploy.units import UNIT_HEADER

TEMPLATE = "firewall/llama-server.nft.j2"
GUARD_TEMPLATE = "firewall/nft-fence-guard.service.j2"
#: the guard's shell (``sh -c GUARD_SHELL NAME TABLE RULES``, or a script file with TABLE RULES):
#: loads the table when it is missing, then again after every change of the host's tables that
#: removed it (``nft monitor`` prints one line per change); when it cannot, it exits 1. The
#: template and a fan-out peer's transient guard (roles/transfer) run this same text.
GUARD_SHELL = ('ensure() { nft list table inet "$1" >/dev/null 2>&1 || nft -f "$2"; }; ensure "$1" "$2" || exit 1; '
               'trap "exit 1" USR2; nft monitor tables | { while read -r _; do kill -0 $$ 2>/dev/null || exit 0; '
               'ensure "$1" "$2" || break; done; kill -USR2 $$; } & wait $!')
DROPIN_TEMPLATE = "firewall/nftables-dropin.conf.j2"
BOUND_TEMPLATE = "firewall/bound-to-fence.conf.j2"
#: the host's nftables service's drop-ins: ours are named after the table
NFTABLES_DROPINS = "/etc/systemd/system/nftables.service.d"


def guard_unit(unit: str) -> str:
    """The guard of ``unit``'s fence: ``llama-server`` -> ``llama-server-fence.service``."""
    return f"{unit}-fence.service"


def bound_dropin(unit: str) -> tuple[str, str]:
    """A distribution's unit's drop-in directory and the drop-in that binds it to its fence."""
    dropins = f"/etc/systemd/system/{unit}.service.d"
    return dropins, f"{dropins}/llamadeploy-fence.conf"


def guard_paths(unit: str, table: str) -> tuple[str, str]:
    """Where the guard unit and the nftables drop-in of a fence live."""
    return f"/etc/systemd/system/{guard_unit(unit)}", f"{NFTABLES_DROPINS}/{table}.conf"


def fence_entries(unit: str, table: str, rules: str, bound: bool = True) -> list[str]:
    """The ownership record's lines for a fence (pure; roles/ownership): its rules file, its
    guard unit, the nftables drop-in that loads it, its table and, for a distribution's unit
    (``bound``, :func:`port_fenced`), the drop-in that binds that unit to the guard. Our own units
    (the server's, the RPC worker's) name the guard themselves."""
    guard, nft_dropin = guard_paths(unit, table)
    lines = [f"file {rules}", f"unit {guard_unit(unit)}", f"file {nft_dropin}", f"table inet {table}"]
    return lines + ([f"file {bound_dropin(unit)[1]}"] if bound else [])


def keeper_texts(unit: str, table: str, rules: str) -> tuple[str, str]:
    """The guard unit and the nftables drop-in that keep a fence loaded (pure)."""
    args = dict(unit_name=unit, table=table, table_arg=systemd_quote(table), rules_arg=systemd_quote(rules),
                guard_shell=GUARD_SHELL.replace("$", "$$"))  # a unit file's $ is written $$
    return render(GUARD_TEMPLATE, **args), render(DROPIN_TEMPLATE, **args)


def kept(unit: str, table: str, rules: str, when: list[Callable[[], bool]] | None = None) -> list[OperationMeta]:
    """The fence of ``unit`` survives a flushed ruleset and a restarted ``nftables.service``.

    The guard is running when this returns (started before the caller binds ``unit`` to it).
    Returns the operations that write the guard and drop-in: a change restarts the fenced
    unit (its guard is ``PartOf=`` it, so it restarts too), which its caller does. ``when``: run
    only if these hold at execution (a rollback's, a fallback's condition).
    """
    return _keepers(unit, table, rules, when)[0]


def _keepers(unit: str, table: str, rules: str,
             when: list[Callable[[], bool]] | None) -> tuple[list[OperationMeta], OperationMeta]:
    """:func:`kept`, and the operation that starts the guard: it runs before ``unit`` is (newly)
    bound to it. systemd stops a running unit whose ``BindsTo=`` names an inactive one as soon
    as it re-reads the binding (daemon-reload), so binding a running service first and starting
    its guard after would stop the service."""
    when = when or []
    guard_text, dropin_text = keeper_texts(unit, table, rules)
    guard_path, dropin_path = guard_paths(unit, table)
    guard = atomic.put(name=f"Fence guard of {unit} (loads the fence again when it goes)", src=StringIO(guard_text),
                       dest=guard_path, mode="644", _if=when)
    # made 755 when missing; one a site already has keeps its own mode and owner (not ours to change)
    files.directory(name="nftables service drop-in directory", path=NFTABLES_DROPINS, mode="755",
                    _no_check_owner_mode=True, _if=when)
    dropin = atomic.put(name=f"Fence of {unit} loaded by the host's nftables service", src=StringIO(dropin_text),
                        dest=dropin_path, mode="644", _if=when)
    systemd.daemon_reload(name="Reload systemd", _if=[*when, any_changed(guard, dropin)])
    running = systemd.service(name=f"Fence guard of {unit} running", service=guard_unit(unit), running=True,
                              _if=when)
    return [guard, dropin], running


def keepers_removed(unit: str, table: str, when: list[Callable[[], bool]] | None = None) -> None:
    """The guard and drop-in of a fence that is no longer wanted: stopped first, so that the
    guard cannot load the table again after it is deleted. ``when``: conditions evaluated as the
    run executes (a rollback's), all of which must hold."""
    cond = list(when or [])
    guard_path, dropin_path = guard_paths(unit, table)
    gone = [dropin_removed(name=f"nftables drop-in of {unit} removed", path=dropin_path, _if=cond)]
    if not units.left_alone(guard_unit(unit)):  # an operator's unit of that name is not ours to remove
        if host.get_fact(File, path=guard_path):
            server.shell(name=f"Fence guard of {unit} stopped",
                         commands=[f"systemctl stop {shlex.quote(guard_unit(unit))}"], _if=cond)
        gone.insert(0, files.file(name=f"Fence guard of {unit} removed", path=guard_path, present=False, _if=cond))
    server.shell(name="nftables drop-in directory removed when empty",
                 commands=[f"rmdir {NFTABLES_DROPINS} 2>/dev/null || true"], _if=[*cond, any_changed(*gone)])
    systemd.daemon_reload(name="Reload systemd", _if=[*cond, any_changed(*gone)])


def table_name(cfg: HostConfig) -> str:
    """nftables identifiers take no '-': ``llama-server`` -> ``llamadeploy_llama_server``."""
    return "llamadeploy_" + cfg.service.name.replace("-", "_")


def rules_path(cfg: HostConfig) -> str:
    return f"{cfg.service.config_dir}/firewall.nft"


def rules(cfg: HostConfig) -> tuple[str, str]:
    """The rules file and the digest it tags the table with (pure)."""
    return fence_rules(table_name(cfg), cfg.service.name, cfg.server.port,
                       [str(n) for n in cfg.server.allow_from or []])


def fence_rules(table: str, unit: str, port: int, networks: list[str]) -> tuple[str, str]:
    """Only ``networks`` (and the host itself) reach TCP ``port``: the rules file and the digest
    it tags the table with (pure)."""
    nets = [ipaddress.ip_network(n, strict=False) for n in networks]
    v4 = sorted({str(n) for n in nets if n.version == 4})
    v6 = sorted({str(n) for n in nets if n.version == 6})
    digest = MARK + hashlib.sha256(repr((table, port, v4, v6)).encode()).hexdigest()[:16]
    return render(TEMPLATE, table=table, unit_name=unit, port=port, v4=v4, v6=v6, digest=digest), digest


def refuse_foreign_table(table: str, setting: str) -> None:
    """Stop the run while pyinfra prepares when the host already has a table of the name a fence
    needs that is not the deploy's (no :data:`MARK` in its comment): loading the fence replaces a
    table of that name whole, and uninstall would delete it. ``setting``: what asks for the fence."""
    comment = host.get_fact(NftTableComment, table=table)
    if comment is not None and not is_ours(comment):
        raise DeployError(
            f"preflight refused host {host.name}: {setting}: this host already has nftables table inet {table}, "
            f"which this deploy did not create (its comment {comment!r} lacks {MARK.strip()!r}; loading the fence "
            "would replace it, and uninstall would delete it); allowed: a host without a table of that name")


def foreign_dropins(found: Mapping[str, str]) -> list[str]:
    """The drop-ins among ``found`` (path -> its first line: the ``FirstLines`` fact) that are
    someone else's: a file whose first line is not the header every file the deploy writes under
    ``/etc/systemd/system`` begins with (pure). An empty file holds nothing to lose: the fence
    writes over it, and the file is the deploy's from then on (``dropin_removed`` removes only a
    file with the header)."""
    return sorted(path for path, first in found.items() if first and not units.has_header(first))


#: the fences already checked in this run, per inventory: (host, table, drop-ins). A deploy whose
#: fallback would reinstate a fenced release checks what its own fence checked moments before
_FENCES_CHECKED: WeakKeyDictionary[Any, set[tuple[str, str, tuple[str, ...]]]] = WeakKeyDictionary()


def refuse_foreign_fence(table: str, setting: str, dropins: Iterable[str]) -> None:
    """Stop the run while pyinfra prepares when a fence would replace what is not the deploy's:
    a table of its name without the mark (:func:`refuse_foreign_table`), or a file where it writes
    a drop-in (``dropins``: the host's nftables service's, a distribution unit's binding) whose
    first line is not the deploy's header. Writing would overwrite the operator's file, and the
    next removal of the fence would delete it as ours. ``setting``: what asks for the fence."""
    key = (host.name, table, tuple(sorted(dropins)))
    checked = _FENCES_CHECKED.setdefault(host.inventory, set())
    if key in checked:
        return
    refuse_foreign_table(table, setting)
    first_lines = host.get_fact(FirstLines, paths=list(key[2]))
    theirs = foreign_dropins(first_lines)
    if theirs:
        raise DeployError(
            f"preflight refused host {host.name}: {setting}: this host already has {theirs[0]}, a drop-in this "
            f"deploy did not create (its first line is not {UNIT_HEADER!r}; the fence would overwrite it, and "
            "removing the fence would delete it); allowed: a host without a file of that name")
    checked.add(key)


@role("Fence")
def port_fenced(cfg: HostConfig, unit: str, table: str, rules: str, port: int, networks: list[str],
                setting: str) -> None:
    """A distribution's service (HAProxy's exporter, Prometheus) reached only by ``networks`` and
    the host itself: our table, kept loaded (:func:`kept`), and a drop-in that binds ``unit`` to
    the fence's guard and loads the rules before every start, as our own units do. ``setting``:
    what asks for the fence, named when the host has a guard unit of that name that is not ours.

    The guard runs its current definition before ``unit`` is bound to it (see :func:`_keepers`).
    Nothing restarts ``unit`` when the guard changes (HAProxy is reloaded, never restarted), so
    a changed guard is restarted here, alone: ``--job-mode=ignore-requirements``, since a plain
    restart of a unit that others are bound to restarts them too (systemd.unit(5), Requires=).
    While its restart job runs, systemd does not stop the units bound to it."""
    units.refuse_foreign({guard_unit(unit): setting}, "a host without a unit of that name")
    dropins, dropin = bound_dropin(unit)
    refuse_foreign_fence(table, setting, [guard_paths(unit, table)[1], dropin])
    packages.installed(cfg, "firewall", name="nftables", packages=["nftables"], update=True, cache_time=24 * 3600,
                       no_recommends=True)
    text, digest = fence_rules(table, unit, port, networks)
    atomic.put(name=f"nftables rules for {unit}'s port {port}", src=StringIO(text), dest=rules, mode="600")
    table_loaded(name=f"nftables rules for {unit}'s port loaded", path=rules, table=table, digest=digest)
    keepers, running = _keepers(unit, table, rules, None)
    server.shell(name=f"Fence guard of {unit} restarted (its definition changed; {unit} keeps running)",
                 commands=[f"systemctl restart --job-mode=ignore-requirements {shlex.quote(guard_unit(unit))}"],
                 _if=[any_changed(*keepers), lambda: not running.did_change()])
    files.directory(name=f"{unit} drop-in directory", path=dropins, mode="755", _no_check_owner_mode=True)
    bound = atomic.put(name=f"{unit} bound to its fence", dest=dropin, mode="644",
                       src=StringIO(render(BOUND_TEMPLATE, unit_name=unit, guard=guard_unit(unit),
                                           rules_arg=systemd_quote(rules))))
    systemd.daemon_reload(name="Reload systemd", _if=bound.did_change)


@role("Fence removed")
def port_unfenced(unit: str, table: str, rules: str) -> None:
    """Undo :func:`port_fenced` (uninstall): ``unit`` unbound from its guard first (so stopping the
    guard cannot stop it), then the guard, its drop-in, the table and the rules file."""
    dropins, dropin = bound_dropin(unit)
    bound = dropin_removed(name=f"{unit} no longer bound to a fence", path=dropin)
    server.shell(name=f"{unit} drop-in directory removed when empty",
                 commands=[f"rmdir {shlex.quote(dropins)} 2>/dev/null || true"],
                 _if=bound.did_change)
    systemd.daemon_reload(name="Reload systemd", _if=bound.did_change)
    keepers_removed(unit, table)
    table_removed(name=f"nftables table of {unit}'s fence removed", table=table)
    files.file(name=f"nftables rules of {unit}'s fence removed", path=rules, present=False)


@role("Firewall")
def firewall(cfg: HostConfig) -> list[OperationMeta]:
    """Rules in place and loaded when ``allow_from`` is set (before the unit that loads them);
    returns the operations whose change restarts the server (its fence's guard and drop-in)."""
    path = rules_path(cfg)
    if cfg.server.allow_from is None:
        return []
    refuse_foreign_fence(table_name(cfg), "llama_server.allow_from", [guard_paths(cfg.service.name, table_name(cfg))[1]])
    packages.installed(cfg, "firewall", name="nftables", packages=["nftables"], update=True, cache_time=24 * 3600,
                       no_recommends=True)
    text, digest = rules(cfg)
    atomic.put(name="nftables rules for the port", src=StringIO(text), dest=path, mode="600")
    table_loaded(name="nftables rules loaded", path=path, table=table_name(cfg), digest=digest)
    return kept(cfg.service.name, table_name(cfg), path)


@role("Firewall removed")
def firewall_off(cfg: HostConfig) -> None:
    """Without ``allow_from``: our table goes, once the unit that loaded it has been replaced.

    The rules file stays: a recorded release whose unit loads it (``ExecStartPre``) must still
    start after a rollback; uninstall removes it with the config directory.
    """
    if cfg.server.allow_from is None:
        keepers_removed(cfg.service.name, table_name(cfg))
        table_removed(name="No nftables table for the port", table=table_name(cfg))
