"""Ownership: the deploy changes and removes only what it created on a host.

Each host keeps a record, ``/var/lib/llamadeploy/<service>.owned``, of the directories, the
account, the units named after the service, the model files and the parent directories the
deploy created (one ``dir PATH``, ``account NAME``, ``unit NAME``, ``file PATH``, ``parent PATH``,
``table FAMILY NAME`` or ``image REF`` per line: docker mode's image, when the host did not have
it; the apt sources and keys it writes, when the host had none), and what its roles write at
fixed paths: every fence's rules, guard unit, drop-ins and nftables table, a front's certificate
and drain marks, a monitor's targets, rules and secrets (each role's ``owned_entries``). Fronts
and monitors keep one too. The packages are recorded beside it, per role (llamadeploy.packages).
Model files are recorded before
they are sent: a deploy whose release fails its gate is in no release record, and its file would
otherwise be no one's, kept by every prune and left by uninstall as an operator's. Before anything
changes, a configured directory that exists, holds something and is not in the record is
refused, naming its field; so is an existing account the record does not name, and a service
name whose unit the host already has from someone else (``ssh``: the deploy would overwrite and
restart sshd's unit, and uninstall would delete it). Uninstall
removes exactly the recorded set (roles/uninstall). Why: an operator's ``/srv/llm`` with their
own files, or ``/etc/nginx`` given as ``config_dir`` by mistake, must never be re-owned,
re-moded, pruned or deleted by us, as Debian's packages remove only what they installed.

A host deployed before records existed (no record, our manifest in ``config_dir``) is adopted
once: the configured directories that deploy evidently made (:func:`adopted_dirs`) and its account
are recorded as ours; any other configured directory is checked as on a fresh host.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from io import StringIO

from pyinfra import host
from pyinfra.api import DeployError
from pyinfra.facts.files import File, FileContents
from pyinfra.facts.server import Users
from pyinfra.operations import files

from llamadeploy import atomic, packages
from llamadeploy.config import HostConfig
from llamadeploy.manifest import Manifest, manifest_path
from llamadeploy.roledeploy import role
from llamadeploy.roles import docker, gpu, rpc
from llamadeploy.roles.docker.facts import DockerImageId
from llamadeploy.roles.firewall import guard_unit
from llamadeploy.roles.ownership.facts import OwnershipRecords, PathStates
from llamadeploy.roles.preflight import is_ours
from llamadeploy.units import UnitFiles, foreign

RECORD_DIR = "/var/lib/llamadeploy"


def record_path(cfg: HostConfig) -> str:
    return posixpath.join(RECORD_DIR, f"{cfg.service.name}.owned")


def service_dirs(cfg: HostConfig) -> dict[str, str]:
    """Inventory field -> every directory a server's deploy creates (what an earlier deploy of
    any role may have left, and adoption looks for)."""
    svc = cfg.service
    return {"llama_service.prefix": svc.prefix, "llama_service.data_dir": svc.data_dir,
            "llama_service.config_dir": svc.config_dir, "llama_service.cache_dir": svc.cache_dir,
            "llama_docker.project_dir": cfg.docker.project_dir}


def configured_dirs(cfg: HostConfig) -> dict[str, str]:
    """Inventory field -> directory this host's deploy creates and owns. A front and a monitor
    make only their package records (``cache_dir``); a server and an RPC worker all of them."""
    dirs = service_dirs(cfg)
    return dirs if serving(cfg) else {"llama_service.cache_dir": dirs["llama_service.cache_dir"]}


def serving(cfg: HostConfig) -> bool:
    """A server or an RPC worker (it runs llama.cpp from a release), not a front or a monitor."""
    return cfg.role in ("server", "rpc_worker")


def adopted_dirs(dirs: dict[str, str], manifest: Manifest | None, packages_recorded: bool) -> frozenset[str]:
    """On a host an earlier deploy served before records existed (no record, its manifest in
    ``config_dir``): the configured directories that deploy evidently made, which are adopted as
    ours (pure). The config directory holds its manifest; the prefix holds the binary it names; the
    data directory the model it names; the compose project directory is the one it names; the
    cache directory holds its package records (``packages_recorded``; also without a manifest:
    a front's or a monitor's, which keep no record). Any other configured directory is checked
    like on any host: an inventory that now points ``data_dir`` at an
    operator's ``/srv/llm`` is refused there too."""
    if manifest is None:  # no earlier deploy of a server here; a front's or monitor's cache directory
        return frozenset(path for field, path in dirs.items() if field.endswith(".cache_dir") and packages_recorded)

    def under(path: str | None, d: str) -> bool:
        return bool(path) and posixpath.normpath(str(path)).startswith(posixpath.normpath(d).rstrip("/") + "/")

    svc = {field.split(".")[-1]: path for field, path in dirs.items()}
    evidence = {"config_dir": True, "prefix": under(manifest.binary, svc.get("prefix", "")),
                "data_dir": under(manifest.model_path, svc.get("data_dir", "")),
                "project_dir": bool(manifest.compose_project)
                and posixpath.normpath(manifest.compose_project or "") == posixpath.normpath(svc.get("project_dir", "")),
                "cache_dir": packages_recorded}
    return frozenset(svc[k] for k, ok in evidence.items() if ok and k in svc)


def ownership_problem(dirs: dict[str, str], states: dict[str, str], owned: frozenset[str],
                      adopted: frozenset[str], user: str | None, user_exists: bool) -> str | None:
    """Why this host's configured paths or account are not ours to use, or None (pure).

    ``owned``: what the host's records (this service's and any other's the deploy made) name;
    ``adopted``: the directories an earlier deploy without records evidently made
    (:func:`adopted_dirs`); ``user``: the service account (native mode), ``user_exists``: on the
    host now (False for an account such a deploy made).
    """
    for field, path in dirs.items():
        if f"dir {path}" in owned or path in adopted:
            continue
        state = states.get(path, "absent")
        if state in ("absent", "empty"):
            continue
        if state == "file":
            return f"{field} = {path!r} is a file on this host; allowed: a directory the deploy creates"
        count, _, first = state.partition(" ")
        return (f"{field} = {path!r} exists on this host and holds {count} entries this deploy did not create "
                f"({', '.join(first.split())}{', ...' if int(count or 0) > 3 else ''}); allowed: a new or empty "
                "directory, or one an earlier deploy created")
    if user and user_exists and f"account {user}" not in owned:
        return (f"llama_service.user = {user!r} is an existing account this deploy did not create; allowed: a "
                "new account (the deploy creates and records it), or one an earlier deploy created")
    return None


def runs_from(record: frozenset[str], name: str, prefix: str) -> bool:
    """Whether service ``name``'s record shows a native unit of its running a release from
    ``prefix``'s current link (pure): the server's unit, or an RPC worker's (recorded by its
    fixed name). A docker-mode service records the prefix, and runs nothing from it."""
    return f"dir {prefix}" in record and bool({f"unit {name}.service", f"unit {rpc.UNIT}.service"} & record)


def prefix_problem(prefix: str, name: str, records: Mapping[str, frozenset[str]]) -> str | None:
    """Why ``llama_service.prefix`` is not this native service's to use, or None (pure): another
    native service on the host runs its releases from it (its record names the directory and its
    unit). Its ``current`` link is that service's binary: this deploy would switch what the other
    service runs at its next restart, and prune builds only the other one's releases use. A
    native service whose own record shows it runs from the prefix already (two services an
    earlier version let share it) goes on as before: refusing it would stop the deploys of a
    service that serves. Two new services given one prefix in the same run, and nested prefixes,
    are not seen: each service's record is read before the run changes anything."""
    if runs_from(records.get(f"{name}.owned") or frozenset(), name, prefix):
        return None
    for record_name in sorted(records):
        other = record_name.removesuffix(".owned")
        if other != name and runs_from(records[record_name], other, prefix):
            return (f"llama_service.prefix = {prefix!r} holds the releases of service {other!r} on this host (its "
                    f"current link is what {other} runs; this deploy would switch it and prune its builds); "
                    "allowed: a prefix no other service's releases run from (or uninstall that service first)")
    return None


def service_units(name: str) -> list[str]:
    """The units the deploy writes under the service's configurable name: the server's and its
    fence's guard (roles/service, roles/firewall); units with fixed names are checked by their
    header (llamadeploy.units)."""
    return [f"{name}.service", guard_unit(name)]


def unit_problem(name: str, found: dict[str, list[tuple[str, str]]], owned: frozenset[str]) -> str | None:
    """Why units named after ``llama_service.name`` are not the deploy's to write, or None (pure).

    ``found``: the ``UnitFiles`` fact. A unit is the deploy's when its only file is a regular file
    in the operator's directory, ``/etc/systemd/system``, whose first line is the deploy's header
    (a host deployed before units were recorded too) or which a record names (an edited header).
    A package's unit, a generated one (a SysV script's), an alias link (``sshd.service``), a mask
    or an operator's own file is someone else's.
    """
    for unit, files_found in found.items():
        theirs = foreign(unit, files_found, owned)
        if theirs:
            return (f"llama_service.name = {name!r}: this host already has {theirs[0]}, a unit this deploy did not "
                    f"create (it would overwrite, restart and on uninstall remove it); allowed: a name no unit on "
                    "the host has, or one an earlier deploy created")
    return None


def record_lines(dirs: dict[str, str], record: frozenset[str] | None, user: str | None,
                 placed: Iterable[str] = (), parents: Iterable[str] = (), units: Iterable[str] = (),
                 images: Iterable[str] = (), fixed: Iterable[str] = ()) -> list[str]:
    """The record after this run: what it held, plus every configured directory, the account,
    the units, the files this run places, the absent parents its directories are created in,
    the docker images it brings and the lines of what its roles write at fixed paths (``fixed``:
    fences, a front's and a monitor's files; each role's ``owned_entries``) (pure)."""
    lines = set(record or ()) | {f"dir {p}" for p in dirs.values()} | {f"file {p}" for p in placed} | set(fixed)
    lines |= {f"parent {p}" for p in parents} | {f"unit {u}" for u in units} | {f"image {i}" for i in images}
    if user:
        lines.add(f"account {user}")
    return sorted(lines)


def apt_files(cfg: HostConfig) -> list[str]:
    """The apt sources and keys the deploy writes for these settings (pure): Docker's repository
    (``llama_docker.engine = "docker-ce"``) and Debian's non-free for NVIDIA's packages
    (``llama_gpu.install = "distro"``). Recorded where the host had none, so uninstall removes
    them after it purged what came from them."""
    out = []
    if cfg.mode == "docker" and cfg.docker.engine != "distro":
        out += [docker.APT_KEY, docker.APT_SOURCE]
    if cfg.cuda and cfg.gpu.install == "distro" and not cfg.gpu.packages_dir:
        out.append(gpu.APT_SOURCE)
    return out


def apt_files_in(record: frozenset[str] | None, kept_engine: bool = False) -> list[str]:
    """The apt sources and keys (:func:`apt_files`) a record names (pure); with ``kept_engine``
    (uninstall keeps a Docker engine that holds someone else's containers) not Docker's, which
    that engine still updates from."""
    known = [gpu.APT_SOURCE] + ([] if kept_engine else [docker.APT_KEY, docker.APT_SOURCE])
    return sorted(p for p in known if f"file {p}" in (record or ()))


def _deepest_first(paths: Iterable[str]) -> list[str]:
    """The order ``rmdir`` needs: children before their parents."""
    return sorted(paths, key=lambda p: (-p.count("/"), p))


def ancestors(dirs: Iterable[str]) -> list[str]:
    """Every proper ancestor of ``dirs`` below ``/``, deepest first (pure)."""
    out: set[str] = set()
    for d in dirs:
        parent = posixpath.dirname(posixpath.normpath(d))
        while parent not in ("/", ""):
            out.add(parent)
            parent = posixpath.dirname(parent)
    return _deepest_first(out)


def parents_in(record: frozenset[str] | None) -> list[str]:
    """The parent directories a record says the deploy created, deepest first (pure)."""
    return _deepest_first(line[len("parent "):] for line in record or () if line.startswith("parent "))


def files_in(record: frozenset[str] | None, directory: str) -> set[str]:
    """Names of the files a record says the deploy placed directly in ``directory`` (pure)."""
    prefix = f"file {directory.rstrip('/')}/"
    return {line[len(prefix):] for line in record or () if line.startswith(prefix) and "/" not in line[len(prefix):]}


def owned_files(cfg: HostConfig, directory: str) -> set[str]:
    """The files this service's record says a deploy placed in ``directory`` (read at prepare time)."""
    return files_in(read(cfg)[0], directory)


def owned_images(cfg: HostConfig) -> set[str] | None:
    """The docker image references this service's record says a deploy brought (read at prepare
    time); None for a host without a record (a host deployed before records: every one, as then)."""
    record = read(cfg)[0]
    return None if record is None else {line[len("image "):] for line in record if line.startswith("image ")}


def read(cfg: HostConfig, records: Mapping[str, frozenset[str]] | None = None
         ) -> tuple[frozenset[str] | None, frozenset[str], bool]:
    """This service's record (None: none yet), what every record on the host names, and whether
    the host is an earlier deploy's without records (adopted). ``records``: the host's records,
    where the caller has read them already."""
    records = host.get_fact(OwnershipRecords, path=RECORD_DIR) if records is None else records
    mine = records.get(posixpath.basename(record_path(cfg)))
    legacy = not records and bool(host.get_fact(File, path=manifest_path(cfg.service.config_dir)))
    return mine, frozenset().union(*records.values()), legacy


def adopted(cfg: HostConfig) -> frozenset[str]:
    """:func:`adopted_dirs` of this host, read from it."""
    lines = host.get_fact(FileContents, path=manifest_path(cfg.service.config_dir))
    try:
        manifest = Manifest.parse("\n".join(lines)) if lines else None
    except ValueError:
        manifest = None
    recorded = bool(host.get_fact(File, path=posixpath.join(cfg.service.cache_dir, packages.BEFORE)))
    # every directory a server's deploy makes: a server an earlier deploy left, now a front or a
    # monitor, keeps what that deploy evidently made (recorded below, so uninstall removes it)
    return adopted_dirs(service_dirs(cfg), manifest, recorded)


@role("Ownership")
def owned(cfg: HostConfig, placed: Iterable[str] = (), fixed: Iterable[str] = ()) -> None:
    """Refuse paths and an account the deploy did not create (while pyinfra prepares, before any
    host changes), then record what this run creates or adopts.

    + placed: the model files this run places (absolute paths), recorded before they are sent
    + fixed: the record lines of what this host's roles write at fixed paths (each role's
      ``owned_entries``: fences, a front's and a monitor's files); their paths are the deploy's
      by name and checked by header or mark where they are written (roles/firewall, llamadeploy.units)
    """
    dirs = configured_dirs(cfg)
    records = host.get_fact(OwnershipRecords, path=RECORD_DIR)
    record, everything, legacy = read(cfg, records)
    runs_llama = serving(cfg)
    user = cfg.service.user if cfg.mode == "native" and runs_llama else None
    account = host.get_fact(Users).get(user) if user else None
    # a host from before records: the account an earlier deploy made (its home is our data_dir,
    # which that deploy's manifest shows it made); a front's or a monitor's package records
    adopted_set = adopted(cfg) if legacy or (record is None and not runs_llama) else frozenset()
    exists = account is not None and not (cfg.service.data_dir in adopted_set and is_ours(cfg, account))
    units = service_units(cfg.service.name)
    problem = (ownership_problem(dirs, host.get_fact(PathStates, paths=list(dirs.values())), everything,
                                 adopted_set, user, exists)
               or (unit_problem(cfg.service.name, host.get_fact(UnitFiles, names=units), everything)
                   if runs_llama else None)
               or (prefix_problem(cfg.service.prefix, cfg.service.name, records)
                   if runs_llama and cfg.mode == "native" else None))
    if problem:
        raise DeployError(f"preflight refused host {host.name}: {problem}")
    # parents that do not exist yet are made with the directories (``mkdir -p``): recorded, so that
    # uninstall removes them again when they are empty (``rmdir``, never their content)
    up = ancestors(dirs.values())
    new_parents = [p for p, state in host.get_fact(PathStates, paths=up).items() if state == "absent"] if up else []
    # docker mode: the image, when this run brings it (loads or pulls it); one the host had before
    # (the operator's, another service's) is not ours to remove
    ref = cfg.docker_image
    images = [ref] if runs_llama and cfg.mode == "docker" and not host.get_fact(DockerImageId, ref=ref) else []
    # the apt sources and keys this host's settings have the deploy write, where the host has none
    apt_written = [p for p in apt_files(cfg) if runs_llama and not host.get_fact(File, path=p)]
    # a front or a monitor on a host an earlier server deploy left without records: what that
    # deploy evidently made (its directories, and its account) is recorded too, so uninstall
    # removes it as it would have removed it from that server
    inherited = [f"dir {d}" for d in sorted(adopted_set)] if not runs_llama else []
    if inherited and legacy and cfg.service.data_dir in adopted_set:
        old = host.get_fact(Users).get(cfg.service.user)
        if old is not None and is_ours(cfg, old):
            inherited.append(f"account {cfg.service.user}")
    files.directory(name="Ownership records directory", path=RECORD_DIR, mode="755")
    atomic.put(name=f"Ownership record ({record_path(cfg)})", src=StringIO("".join(
        f"{line}\n" for line in record_lines(dirs, record, user, [*placed, *apt_written], new_parents,
                                             units if cfg.mode == "native" and cfg.role == "server" else (),
                                             images, [*fixed, *inherited]))),
        dest=record_path(cfg), mode="644")
