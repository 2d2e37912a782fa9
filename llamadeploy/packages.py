"""System packages the deploy installs, recorded per role so that uninstall removes exactly those.

A package that was on the host before the first deploy is never recorded, so
uninstalling never takes away something the host had before (curl, ca-certificates
on most images). One record file per role (``<cache_dir>/installed-packages.<role>``):
each role reads its own record at prepare time and adds what it is about to install.
The first deploy also keeps the list of every package the host had
(``<cache_dir>/packages-before-deploy``): the dependencies apt pulled in with ours are
removed at uninstall only when nothing needs them any more *and* they were not there
before, because apt's own autoremove keeps anything another package merely suggests. Beside
it, the users and groups the host had (``accounts-before-deploy``): the accounts our packages'
postinsts create are removed at uninstall, those the host had stay.

A service package the deploy configures (HAProxy, Prometheus, Alertmanager, the node exporter)
that the host has and no deploy installed is someone else's: its config would be replaced and
its service restarted, so the run is refused before anything changes (:func:`refuse_foreign`).
The record is written before apt runs, so that an install cut off halfway is still ours.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from io import StringIO
from typing import Any

from pyinfra import host
from pyinfra.api import DeployError
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import File, FileContents
from pyinfra.facts.server import Groups, Users
from pyinfra.operations import apt, files

from llamadeploy import atomic
from llamadeploy.config import HostConfig

RECORD_PREFIX = "installed-packages."
BEFORE = "packages-before-deploy"
#: the system accounts (users and groups) the host had before the first deploy: a package's
#: postinst creates its account (``prometheus``) and Debian's purge keeps it; uninstall removes
#: only one that is not listed here (roles/uninstall/plan.py)
ACCOUNTS_BEFORE = "accounts-before-deploy"
#: the roles that install packages (each keeps its own record)
RECORDING_ROLES = ("build", "docker", "model", "firewall", "front", "monitor", "transfer", "rpc", "node", "gpu")


#: a run's state -> (host, record) -> the packages this run has recorded there so far (gone with the run)
_RECORDED: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], set[str]]] = weakref.WeakKeyDictionary()


def record_path(cfg: HostConfig, role: str) -> str:
    return f"{cfg.service.cache_dir}/{RECORD_PREFIX}{role}"


def recorded(lines: list[str] | None) -> list[str]:
    """Package names in a record file's content (pure)."""
    return sorted({line.strip() for line in lines or [] if line.strip()})


def installed(cfg: HostConfig, role: str, name: str, packages: list[str], **apt_kwargs: Any) -> OperationMeta:
    """``apt.packages`` that remembers which of ``packages`` were missing before it ran."""
    recording(cfg, role, packages)
    return apt.packages(name=name, packages=packages, **apt_kwargs)


def recording(cfg: HostConfig, role: str, packages: list[str]) -> None:
    """Record which of ``packages`` the host lacks, before something installs them (``apt.packages``,
    or ``apt.deb`` for a package that comes as a file)."""
    have = host.get_fact(DebPackages) or {}
    missing = [p for p in packages if p not in have]
    assert role in RECORDING_ROLES, role
    path = record_path(cfg, role)
    # what an earlier call of this run recorded there too: facts are read while pyinfra prepares,
    # so each call sees the record as the run found it, and would write over the one before
    this_run = _this_run(path)
    before = sorted(set(recorded(host.get_fact(FileContents, path=path))) | this_run)
    before_path = f"{cfg.service.cache_dir}/{BEFORE}"
    if host.get_fact(FileContents, path=before_path) is None:
        files.directory(name="Cache directory", path=cfg.service.cache_dir, mode="755")
        atomic.put(name="Record the packages the host had before the first deploy",
                   src=StringIO("\n".join(sorted(have)) + "\n"), dest=before_path, mode="644")
    accounts_path = f"{cfg.service.cache_dir}/{ACCOUNTS_BEFORE}"
    # (a host first deployed before this record: its accounts now, the deploy's among them, so
    # that none of them is ever taken for ours)
    # the accounts are read only while there is no record: a re-deploy pays for no listing. Never
    # a record without root: a listing that failed would make every account look like ours
    users = host.get_fact(Users) or {} if host.get_fact(FileContents, path=accounts_path) is None else {}
    if "root" in users:
        files.directory(name="Cache directory", path=cfg.service.cache_dir, mode="755")
        atomic.put(name="Record the accounts the host had before the first deploy",
                   src=StringIO(accounts_text(users, host.get_fact(Groups) or [])), dest=accounts_path, mode="644")
    _record(cfg, role, path, before, missing, this_run)


def _this_run(path: str) -> set[str]:
    """The packages this run has recorded in ``path`` on this host so far."""
    return _RECORDED.setdefault(host.state, {}).setdefault((host.name, path), set())


def _record(cfg: HostConfig, role: str, path: str, before: list[str], names: list[str], this_run: set[str]) -> None:
    """Write ``role``'s record with ``names`` added, when that adds something."""
    after = sorted(set(before) | set(names))
    this_run.update(after)
    if after != before:  # before apt: a package it installs is ours even if the run stops there
        files.directory(name="Cache directory", path=cfg.service.cache_dir, mode="755")
        atomic.put(name=f"Record packages installed for {role}", src=StringIO("\n".join(after) + "\n"),
                   dest=path, mode="644")


def accounts_text(users: Mapping[str, Any], groups: list[str]) -> str:
    """The accounts record: ``user NAME`` and ``group NAME`` lines (pure)."""
    return "".join([f"user {u}\n" for u in sorted(users)] + [f"group {g}\n" for g in sorted(groups)])


def foreign(packages: list[str], have: Mapping[str, Any], mine: list[str]) -> list[str]:
    """Of ``packages``, those the host has and no deploy of ours installed (pure)."""
    return [p for p in packages if p in have and p not in mine]


#: role -> (package, the package whose record replaced its own): the record overwrite of releases
#: before 2026-12-05, when a role installed two packages in one run (a monitor: Prometheus, then
#: Alertmanager) and the second install's record replaced the first's
OVERWRITTEN: dict[str, tuple[tuple[str, str], ...]] = {"monitor": (("prometheus", "prometheus-alertmanager"),)}


def lost(role: str, packages: list[str], have: Mapping[str, Any], mine: list[str] | None,
         had: list[str] | None) -> list[str]:
    """Of ``packages``, those a deploy of ours installed although that overwrite dropped them from
    ``role``'s record (pure): exactly its pattern, nothing wider. The package is on the host and
    not in the record, the package whose record replaced it is (``mine``, None when the role has
    no record), and the list of what the host had before the first deploy (``had``) does not name
    it. Without ``had`` (a host first deployed before that list existed) nothing is inferred; any
    other package missing from a record stays someone else's (an Alertmanager an operator
    installed after a deploy without one is refused, as before)."""
    if mine is None or had is None:
        return []
    return [p for p, by in OVERWRITTEN.get(role, ())
            if p in packages and p in have and p not in mine and by in mine and p not in had]


def refuse_foreign(cfg: HostConfig, role: str, packages: list[str], setting: str, allowed: str) -> None:
    """Stop the run while pyinfra prepares when the host has one of ``packages`` that this role's
    record does not list: an operator's HAProxy or Prometheus would have its config replaced and
    its service restarted. ``setting`` is what asks for it, ``allowed`` what the operator can do.
    A package an earlier release of ours installed and then dropped from the record by its known
    overwrite (:func:`lost`) is put back in the record instead, so that uninstall removes it."""
    have = host.get_fact(DebPackages) or {}
    path = record_path(cfg, role)
    lines = host.get_fact(FileContents, path=path)
    had = host.get_fact(FileContents, path=f"{cfg.service.cache_dir}/{BEFORE}")
    this_run = _this_run(path)
    mine = sorted(set(recorded(lines)) | this_run)
    exists = lines is not None or host.get_fact(File, path=path) is not None  # an empty record reads as None
    ours = lost(role, packages, have, mine if exists else None, recorded(had) if had else None)
    if ours:
        host.noop(f"{', '.join(ours)}: installed by an earlier deploy of ours and missing from its record (the "
                  "record overwrite of releases before 2026-12-05); recorded again")
        _record(cfg, role, path, mine, ours, this_run)
    theirs = [p for p in foreign(packages, have, mine) if p not in ours]
    if theirs:
        raise DeployError(
            f"preflight refused host {host.name}: {setting}: {', '.join(theirs)} is installed and this deploy did not "
            f"install it (its config would be replaced, its service restarted); allowed: {allowed}")
