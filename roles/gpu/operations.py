"""The GPU role's own operations: pin llama.cpp's fit in the unit, and Docker's NVIDIA runtime."""

from __future__ import annotations

import shlex
from io import StringIO

from pyinfra import host
from pyinfra.api import FunctionCommand, OperationError, StringCommand, operation
from pyinfra.facts.files import FileContents

from llamadeploy import gpu
from llamadeploy.tuning import systemd_quote


def _fit_and_write(fit_cmd: list[str], margin_mib: int, unit: str, planned: list[str], binary: str,
                   dropin: str, digest: str) -> None:
    """Run when the operation executes (the release is on the host by then): read what the running
    server holds on the GPU, run llama-fit-params, pin its result, replace the drop-in by rename."""
    _, apps = host.run_shell_command(StringCommand(
        f"pid=$(systemctl show -p MainPID --value {shlex.quote(unit)} 2>/dev/null || echo 0); echo pid=$pid; "
        "nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null || true"))
    lines = apps.stdout.splitlines()
    pid = int(lines[0].removeprefix("pid=")) if lines and lines[0].removeprefix("pid=").isdigit() else None
    margin = gpu.fit_margin(margin_mib, gpu.held_mib("\n".join(lines[1:]), pid or None))
    cmd = [*fit_cmd[:-1], str(margin)] if fit_cmd[-2] == "--fit-target" else fit_cmd
    ok, out = host.run_shell_command(StringCommand(shlex.join(cmd) + " 2>&1"))
    try:
        fitted = gpu.parse_fit_params(out.stdout)
    except gpu.GpuError as exc:
        tail = "\n".join(out.stdout.splitlines()[-15:])
        raise OperationError(f"{exc}\n{shlex.join(cmd)} said:\n{tail}") from None
    text = gpu.fit_dropin(binary, gpu.pinned_args(planned, fitted, None), digest, systemd_quote)
    tmp = f"{dropin}.partial"
    host.run_shell_command(StringCommand(f"mkdir -p {shlex.quote(dropin.rsplit('/', 1)[0])}"))
    if not host.put_file(StringIO(text), tmp):
        raise OperationError(f"could not write {tmp}")
    ok, _ = host.run_shell_command(StringCommand(f"chmod 644 {shlex.quote(tmp)} && mv -f {shlex.quote(tmp)} "
                                                 f"{shlex.quote(dropin)}"))
    if not ok:
        raise OperationError(f"could not move {tmp} into place")


@operation()
def fit_pinned(fit_cmd: list[str], margin_mib: int, unit: str, planned: list[str], binary: str, dropin: str,
               digest: str):
    """
    Pin llama.cpp's own offload fit in a systemd drop-in, so that every restart behaves the same.

    + fit_cmd: the ``llama-fit-params`` command (``gpu.fit_params_command``, ending in ``--fit-target N``)
    + margin_mib: ``llama_gpu.fit_margin_mib``; lowered by what the running server holds (its restart frees it)
    + unit: the server's systemd unit (whose main process may hold GPU memory now)
    + planned: the server's planned arguments; the fitted ``-c``/``-ngl``/``-ts``/``-ot`` replace theirs
    + binary: the path the unit runs
    + dropin: the drop-in file (``<unit>.service.d/gpu-fit.conf``)
    + digest: ``gpu.fit_inputs_digest`` of release, model, fit command and GPUs

    Nothing to do when the drop-in records the same digest. Otherwise the fit runs when the
    operation executes, after the release and the model are on the host; a fit that fails (the
    model cannot be loaded at all) fails the host before its unit or release changes.
    """
    current = host.get_fact(FileContents, path=dropin)
    if current and current[0] == f"# inputs {digest}":
        host.noop(f"offload pinned for these inputs ({digest})")
        return
    yield FunctionCommand(_fit_and_write, (fit_cmd, margin_mib, unit, planned, binary, dropin, digest), {})


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
