"""Reach the deployed hosts of an inventory (for ``bench --inventory``), through pyinfra.

pyinfra does the connecting (SSH, sudo, host data); we only read what the deploy
left on each host: the manifest, the key file, and a bandwidth probe.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    host: str
    url: str
    api_key: str | None
    model_bytes: int
    read_bandwidth: int | None  #: bytes/s, single core


def inventory_targets(path: str, probe_command: str) -> list[Target]:
    """One target per host of the inventory file: URL, key, model size, measured bandwidth."""
    from pyinfra.api import Config, State
    from pyinfra.api.connect import connect_all
    from pyinfra.context import ctx_state
    from pyinfra_cli.inventory import make_inventory

    # the same sequence as pyinfra's CLI: a state in context, the inventory, connect
    state = State()
    ctx_state.set(state)
    inventory = make_inventory(path, cwd=os.getcwd())
    state.init(inventory, Config())
    connect_all(state)
    targets = []
    for host in inventory.get_active_hosts():
        def run(command: str) -> str:
            ok, out = host.run_shell_command(command, _sudo=host.data.get("_sudo", False))
            if not ok:
                raise RuntimeError(f"{host.name}: {command.split()[0]} failed: {out.stderr}")
            return out.stdout

        manifest = json.loads(run("cat /etc/llama-server/deploy.json"))
        key = run(f"cat {manifest['api_key_file']}").strip() if manifest.get("api_key_file") else None
        model_dir = manifest["model_path"].rsplit("/", 1)[0]  # on the host, in both modes
        sizes = run("stat -c %s " + " ".join(f"{model_dir}/{name}" for name in manifest["model_files"]))
        probe = run(probe_command).strip()
        address = host.data.get("ssh_hostname") or host.name
        targets.append(Target(host.name, f"http://{address}:{manifest['port']}", key,
                              sum(int(x) for x in sizes.split()), int(probe) if probe.isdigit() else None))
    for host in inventory.get_active_hosts():
        host.disconnect()
    return targets
