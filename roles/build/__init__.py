"""Native build role: llama.cpp from a pinned release, compiled once per kind of host.

Debian 12 and 13 (apt) only; other systems are refused early (roles/preflight) with a clear
message rather than half-installing. Build once, ship many: ``artifact.py``.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

from pyinfra import host
from pyinfra.api.host import Host
from pyinfra.api.inventory import Inventory
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import File
from pyinfra.facts.server import Arch, LinuxDistribution
from pyinfra.operations import files

from llamadeploy import packages
from llamadeploy.config import HostConfig
from llamadeploy.hostdata import validate_inventory
from llamadeploy.roledeploy import role
from llamadeploy.roles import gpu, transfer
from llamadeploy.roles.build.artifact import artifact_path, artifact_sha256, host_kind
from llamadeploy.roles.build.facts import CpuFlagsDigest
from llamadeploy.roles.build.operations import artifact_fetched, artifact_installed, build_release, fanout_path


def build_packages(cfg: HostConfig) -> list[str]:
    """Packages the build needs; what the config asks for decides the extras."""
    pkgs = ["build-essential", "cmake", "curl", "ca-certificates"]
    if cfg.build.source == "git":
        pkgs.append("git")
    if cfg.build.ccache:
        pkgs.append("ccache")
    if cfg.build.blas == "openblas":
        pkgs.append("libopenblas-dev")
    return pkgs


def runtime_packages(cfg: HostConfig) -> list[str]:
    """What a shipped (not compiled here) release needs to run: OpenMP, and OpenBLAS if linked."""
    pkgs = ["libgomp1", "curl", "ca-certificates"]
    if cfg.build.blas == "openblas":
        pkgs.append("libopenblas0")
    return pkgs


#: per pyinfra run (its inventory): host -> kind, and (release key, kind) -> builder; every host's
#: prepare step asks, so without these a fleet of N hosts would read N x N facts
_KINDS: WeakKeyDictionary[Inventory, dict[str, str]] = WeakKeyDictionary()
_BUILDERS: WeakKeyDictionary[Inventory, dict[tuple[str, str], str]] = WeakKeyDictionary()


def kind_of(h: Host, cfg: HostConfig) -> str:
    """The kind of host ``h`` is, for sharing builds (see ``artifact.host_kind``)."""
    kinds = _KINDS.setdefault(h.inventory, {})
    if h.name not in kinds:
        distro: Any = h.get_fact(LinuxDistribution)
        kinds[h.name] = (host_kind(distro, h.get_fact(Arch), h.get_fact(CpuFlagsDigest), cfg.build.native)
                         + gpu.kind_suffix(h, cfg))
    return kinds[h.name]


def builder_for(cfg: HostConfig, kind: str) -> str:
    """The host that compiles ``cfg``'s release for ``kind`` in this run: the first active host of
    the inventory with that kind and release key that does not have the release yet."""
    builders = _BUILDERS.setdefault(host.inventory, {})
    key = (cfg.build.release_key(), kind)
    if key not in builders:
        builders[key] = _first_builder(cfg, kind)
    return builders[key]


def _first_builder(cfg: HostConfig, kind: str) -> str:
    configs = validate_inventory(host.inventory)
    active = set(host.inventory.get_active_hosts())
    for h in (h for h in host.inventory if h in active):  # inventory order
        other = configs.get(h.name)
        if other is None or other.mode != "native" or other.build.release_key() != cfg.build.release_key():
            continue
        try:
            if kind_of(h, other) == kind and not h.get_fact(File, path=f"{other.release_dir}/bin/llama-server"):
                return h.name
        except Exception:  # noqa: BLE001 - a host whose facts fail cannot build for the others
            continue
    return host.name


@role("Build llama.cpp (native)")
def native_build(cfg: HostConfig, g: gpu.GpuHost | None = None) -> list[OperationMeta]:
    """Compile the release on this host, or install the one another host of its kind built.

    With ``build_once`` (the default), one host per kind compiles (see :func:`builder_for`)
    and sends the release to the controller's cache; the others get it from there, pushed
    and sha256-verified, and need no compiler. ``current`` does not move here: the service
    role checks the new binary (its ``--version`` and ``--help`` against the flags the unit
    will use) first, and only then switches the link, so a release that would not start
    never becomes current.
    """
    svc = cfg.service
    key = cfg.build.release_key()
    kind = kind_of(host, cfg)
    cached = artifact_path(key, kind)
    present = bool(host.get_fact(File, path=f"{cfg.release_dir}/bin/llama-server"))
    builder = host.name if present or not cfg.build.build_once or artifact_sha256(cached) else builder_for(cfg, kind)
    compiles = not present and (not cfg.build.build_once or (builder == host.name and not artifact_sha256(cached)))
    files.directory(name="Release directory", path=f"{svc.prefix}/releases", mode="755")
    files.directory(name="Build cache", path=svc.cache_dir, mode="755")
    # Every host calls the same operations in the same order (a no-op where they do not apply):
    # pyinfra runs each operation on every host before the next one, so the builder's
    # "sent to the controller's cache" finishes before any host's "from the controller's cache".
    packages.installed(cfg, "build", name="Build dependencies" if compiles else "Runtime libraries of a shipped release",
                       packages=build_packages(cfg) if compiles else runtime_packages(cfg),
                       update=True, cache_time=24 * 3600, no_recommends=True)
    built = build_release(name=f"Build llama-server {key}", build=cfg.build, release_dir=cfg.release_dir,
                          cache_dir=svc.cache_dir, compile=compiles or present,
                          host_defines=g.cmake_defines() if g else None)
    artifact_fetched(name=f"Release {key} ({kind}) sent to the controller's cache", release_dir=cfg.release_dir,
                     cache_dir=svc.cache_dir, controller_path=str(cached), enabled=compiles and cfg.build.build_once)
    if cfg.transfer.mode == "fanout" and cfg.build.build_once and not present and not compiles:
        transfer.fanned_out(cfg, transfer.Shipment(f"release:{key}:{kind}", f"release {key}", str(cached),
                                                   fanout_path(svc.cache_dir, cfg.release_dir), None),
                            holds=False)
    shipped = artifact_installed(name=f"Release {key} ({kind}) from the controller's cache",
                                 release_dir=cfg.release_dir, cache_dir=svc.cache_dir, controller_path=str(cached),
                                 builder=builder, enabled=not present and not compiles)
    return [built, shipped]
