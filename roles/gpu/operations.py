"""The GPU role's own operations: pin llama.cpp's fit in the unit, and Docker's NVIDIA runtime."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import operation
from pyinfra.facts.files import File

from llamadeploy import gpu


@operation()
def fit_pinned(fit_cmd: list[str], margin_mib: int, unit: str, env_path: str, digest: str,
               run_as: list[str] | None = None, device_nodes: list[str] | None = None):
    """
    Pin llama.cpp's own offload fit for the unit, so that every restart behaves the same.

    + fit_cmd: the ``llama-fit-params`` command (``gpu.fit_params_command``, ending in ``--fit-target N``)
    + margin_mib: ``llama_gpu.fit_margin_mib``; what the running server holds is given back to it
    + unit: the server's systemd unit (whose main process may hold GPU memory now)
    + env_path: ``<config_dir>/gpu-fit/<digest>.env``, the unit's ``EnvironmentFile``
    + digest: ``gpu.fit_inputs_digest`` of release, model, fit command and GPUs
    + run_as: the words the fit runs behind (``hardening.sandboxed_run``: the service's user and sandbox)
    + device_nodes: root's commands that create the GPUs' device nodes first (``gpu.device_node_commands``)

    The file is named by the digest of the fit's inputs, so it exists exactly when this fit was
    pinned: nothing to do then. Otherwise the fit runs when the operation executes, after the
    release and the model are on the host and before anything switches (``gpu.fit_script``).
    """
    if host.get_fact(File, path=env_path):
        host.noop(f"offload pinned for these inputs ({digest})")
        return
    yield gpu.fit_script(fit_cmd, margin_mib, unit, env_path, digest, run_as or (), device_nodes or ())


@operation()
def docker_runtime(configured: bool):
    """
    Docker's ``nvidia`` runtime, configured by the NVIDIA container toolkit's own tool.

    + configured: whether ``/etc/docker/daemon.json`` already names the ``nvidia`` runtime

    ``nvidia-ctk runtime configure --runtime=docker`` edits daemon.json (bookworm's Docker 20.10
    has no CDI), then dockerd restarts so that compose's GPU reservation finds the runtime.
    """
    if configured:
        host.noop("docker has the nvidia runtime")
        return
    yield "nvidia-ctk runtime configure --runtime=docker && systemctl restart docker"
