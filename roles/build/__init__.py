"""Native build role: llama.cpp from a pinned release, compiled on the host.

Debian/Ubuntu (apt) only for now; other package managers fail early with a
clear message rather than half-installing.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import DeployError
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.server import LinuxDistribution
from pyinfra.operations import files

from llamadeploy import packages
from llamadeploy.config import HostConfig
from llamadeploy.roledeploy import role
from llamadeploy.roles.build.operations import build_release

SUPPORTED = ("Debian", "Ubuntu")


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


@role("Build llama.cpp (native)")
def native_build(cfg: HostConfig) -> OperationMeta:
    """Install build dependencies and build the release into its own directory.

    ``current`` does not move here: the service role checks the new binary (its
    ``--version`` and ``--help`` against the flags the unit will use) first, and only
    then switches the link, so a release that would not start never becomes current.
    """
    distro = host.get_fact(LinuxDistribution)
    if distro.get("name") not in SUPPORTED:
        raise DeployError(
            f"{host.name}: native mode supports {', '.join(SUPPORTED)} (apt); "
            f"this host runs {distro.get('name')!r}"
        )
    packages.installed(cfg, "build", name="Install build dependencies", packages=build_packages(cfg),
                       update=True, cache_time=24 * 3600, no_recommends=True)
    svc = cfg.service
    files.directory(name="Release directory", path=f"{svc.prefix}/releases", mode="755")
    files.directory(name="Build cache", path=svc.cache_dir, mode="755")
    return build_release(
        name=f"Build llama-server {cfg.build.release_key()}",
        build=cfg.build,
        release_dir=cfg.release_dir,
        cache_dir=svc.cache_dir,
    )
