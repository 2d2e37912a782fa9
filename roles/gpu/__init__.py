"""GPU role: NVIDIA hosts (``llama_build.backend = "cuda"``): driver and toolkit, the build's CUDA
architectures, the offload pinned from llama.cpp's own fit, and Docker's NVIDIA runtime.

Facts (``facts.py``) feed pure rules (:mod:`llamadeploy.gpu`, unit-tested on recorded output of real
GPUs). A CPU host reads no GPU fact and gets no operation from here. Its templates are the service
unit's ``DeviceAllow=`` lines (``templates/service``) and the compose GPU reservation (``templates/docker``).
"""

from __future__ import annotations

import posixpath
import shlex
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

from debian.arfile import ArError
from debian.debfile import DebError, DebFile
from pyinfra import host
from pyinfra.api import DeployError
from pyinfra.api.host import Host
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import File, FileContents
from pyinfra.facts.server import Arch, LinuxDistribution
from pyinfra.operations import apt, files, server

from llamadeploy import gpu, packages
from llamadeploy.config import HostConfig
from llamadeploy.hardening import sandboxed_run
from llamadeploy.roledeploy import role
from llamadeploy.roles.gpu.facts import CudaToolkit, NvidiaGpus
from llamadeploy.roles.gpu.operations import docker_runtime, fit_pinned
from llamadeploy.tuning import unit_limits

DAEMON_JSON = "/etc/docker/daemon.json"


@dataclass(frozen=True)
class GpuHost:
    """What a CUDA host has: its GPUs and (native mode) its CUDA toolkit release."""

    gpus: tuple[gpu.Gpu, ...]
    cuda: str | None
    archs: str  #: CMAKE_CUDA_ARCHITECTURES: llama_build.cuda_architectures, or from the GPUs

    @property
    def kind(self) -> str:
        """The build-kind suffix (``cuda13.0-sm90``): CUDA builds are shared only between hosts with
        the same toolkit release and architectures."""
        return gpu.cuda_release_kind(self.cuda or "0.0", self.archs)

    def cmake_defines(self) -> dict[str, str]:
        """What joins the release's own CMake options on this host (not part of the release key:
        the kind carries it). nvcc is found by CMake on PATH; NVIDIA's packages put it in
        ``/usr/local/cuda/bin``, which the build adds to PATH."""
        return {"CMAKE_CUDA_ARCHITECTURES": self.archs}


def _read(cfg: HostConfig) -> tuple[list[gpu.Gpu], str | None, list[str]]:
    """The host's GPUs, its nvcc release (native mode only) and what a CUDA host of its mode lacks
    ("driver", "toolkit", "container_toolkit"), read once for the checks and the install alike."""
    gpus = host.get_fact(NvidiaGpus)
    cuda = host.get_fact(CudaToolkit) if cfg.mode == "native" else None
    missing = []
    if not gpus:
        missing.append("driver")
    if cfg.mode == "native" and not cuda:
        missing.append("toolkit")
    if cfg.mode == "docker" and not host.get_fact(File, path="/usr/bin/nvidia-ctk"):
        missing.append("container_toolkit")
    return gpus, cuda, missing


def _has_docker_runtime() -> bool:
    daemon = host.get_fact(FileContents, path=DAEMON_JSON) or []
    return any('"nvidia"' in line for line in daemon)


def gpu_host(cfg: HostConfig) -> GpuHost | None:
    """Read and check a CUDA host while pyinfra prepares: every refusal names the host, the
    setting and what is allowed, before anything changes. None on a CPU host, and on a host
    whose driver/toolkit this run installs (:func:`installed` then stops its deploy)."""
    if not cfg.cuda:
        return None
    gpus, cuda, missing = _read(cfg)
    if missing:
        what = {"driver": "nvidia-smi reports no NVIDIA GPU (no driver loaded)",
                "toolkit": "there is no CUDA toolkit (nvcc) for the build",
                "container_toolkit": "the NVIDIA container toolkit (nvidia-ctk) is not installed"}
        if cfg.gpu.install == "no" and not cfg.gpu.packages_dir:
            raise DeployError(
                f"preflight refused host {host.name}: llama_build.backend = 'cuda' but "
                f"{'; '.join(what[m] for m in missing)}. "
                "Allowed: install it, or set llama_gpu.install 'distro' / 'nvidia' (or llama_gpu.packages_dir) "
                "to have the deploy install it, or llama_build.backend 'cpu'")
        return None
    try:
        archs = cfg.build.cuda_architectures or gpu.cuda_architectures(gpus)
        for g in gpus:
            if cuda:
                gpu.check_driver(g.driver, cuda)
        if cuda and not cfg.build.cuda_architectures:
            gpu.cuda_cmake_args(gpus, cuda)  # refuses an architecture this toolkit cannot compile
    except gpu.GpuError as exc:
        raise DeployError(f"preflight refused host {host.name}: llama_build.backend = 'cuda': {exc}") from None
    if cfg.mode == "native":
        # a release is immutable and named by its key, which does not hold the architectures taken
        # from the GPUs: a host whose GPUs changed would keep running code built for the old ones
        info = host.get_fact(FileContents, path=f"{cfg.release_dir}/BUILD-INFO") or []
        built = next((ln.split("=", 1)[1] for ln in info if ln.startswith("CMAKE_CUDA_ARCHITECTURES=")), archs)
        present = host.get_fact(File, path=f"{cfg.release_dir}/bin/llama-server")
        if present and not cfg.server.gpu_layers and not host.get_fact(File, path=f"{cfg.release_dir}/bin/llama-fit-params"):
            raise DeployError(
                f"preflight refused host {host.name}: its release {cfg.build.release_key()} has no llama-fit-params "
                f"(built before releases had it), so its offload cannot be fitted: remove {cfg.release_dir} to "
                "rebuild it, or set llama_server.gpu_layers")
        if built != archs:
            raise DeployError(
                f"preflight refused host {host.name}: its release {cfg.build.release_key()} was built for "
                f"CMAKE_CUDA_ARCHITECTURES={built}, its GPUs need {archs}: set llama_build.cuda_architectures "
                f"(a release of its own), or remove {cfg.release_dir} to rebuild it")
    return GpuHost(tuple(gpus), cuda, archs)


#: the apt source ``install = "distro"`` adds; recorded as the deploy's where the host had none
#: (roles/ownership), so that uninstall removes it
APT_SOURCE = "/etc/apt/sources.list.d/llamadeploy-nvidia.list"


@role("NVIDIA driver and CUDA toolkit")
def installed(cfg: HostConfig) -> bool:
    """Install what a CUDA host lacks (``llama_gpu.install`` / ``packages_dir``); True when this run
    installs something. Such a host's deploy stops after the install: a new driver needs a reboot
    before nvidia-smi sees the GPUs, and the next deploy reads the host afresh."""
    if not cfg.cuda:
        return False
    _, _, missing = _read(cfg)
    if not missing or (cfg.gpu.install == "no" and not cfg.gpu.packages_dir):
        return False  # nothing to install, or nothing allowed to: gpu_host refuses the host
    if cfg.gpu.packages_dir:
        debs = sorted(Path(cfg.gpu.packages_dir).glob("*.deb"))
        if not debs:
            raise DeployError(f"preflight refused host {host.name}: llama_gpu.packages_dir = "
                              f"{cfg.gpu.packages_dir!r} holds no .deb file")
        # recorded before they are installed, as apt's are: uninstall purges what this run brought
        packages.recording(cfg, "gpu", deb_names(debs, "llama_gpu.packages_dir"))
        stage = f"{cfg.service.cache_dir}/gpu-debs"
        files.directory(name="GPU packages directory", path=stage, mode="755")
        for deb in debs:
            files.put(name=f"GPU package {deb.name}", src=str(deb), dest=f"{stage}/{deb.name}", mode="644")
        paths = " ".join(shlex.quote(f"{stage}/{d.name}") for d in debs)
        server.shell(name="Install the pushed GPU packages",
                     commands=[f"DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {paths}"])
    else:
        try:
            deb_arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(host.get_fact(Arch), "amd64")
            pkgs = gpu.install_packages(cfg.gpu.install, cfg.mode == "docker", "driver" in missing,
                                        "toolkit" in missing, "container_toolkit" in missing, deb_arch)
        except gpu.GpuError as exc:
            raise DeployError(f"preflight refused host {host.name}: llama_gpu.install = {cfg.gpu.install!r}: {exc}") from None
        distro: Any = host.get_fact(LinuxDistribution)  # a TypedDict, read as a mapping
        source = gpu.package_source(cfg.gpu.install, distro, host.get_fact(Arch), cfg.gpu.nvidia_repo)
        if cfg.gpu.install == "distro":
            files.put(name="Debian contrib and non-free (NVIDIA driver, CUDA toolkit)", src=StringIO(source),
                      dest=APT_SOURCE, mode="644")
        else:
            packages.recording(cfg, "gpu", ["cuda-keyring"])  # apt.deb installs it: recorded before, as apt's are
            apt.deb(name="NVIDIA's CUDA repository key (cuda-keyring)", src=posixpath.join(source, gpu.CUDA_KEYRING))
        packages.installed(cfg, "gpu", name=f"NVIDIA packages: {', '.join(pkgs)}", packages=pkgs, update=True,
                           no_recommends=True)
    host.noop(f"{host.name}: installed the NVIDIA {', '.join(missing)}; reboot it if the driver was installed, "
              "then deploy again (this run changes nothing else on it)")
    return True


def deb_names(debs: list[Path], field: str) -> list[str]:
    """The package names in ``debs`` (.deb files on the controller), read from their control files
    with python-debian: what ``apt-get install ./x.deb`` will install, known before it runs, so
    that the package record names them as it names apt's. A file that is no Debian package is
    refused, naming ``field``."""
    names = set()
    for deb in debs:
        try:
            names.add(str(DebFile(str(deb)).debcontrol()["Package"]))
        except (OSError, KeyError, ValueError, DebError, ArError) as exc:
            raise DeployError(f"preflight refused host {host.name}: {field}: {deb.name} is not a Debian package "
                              f"with a name ({type(exc).__name__}: {exc}); allowed: .deb files") from None
    return sorted(names)


def container_runtime(cfg: HostConfig, g: GpuHost | None) -> None:
    """Docker mode on a GPU host: the engine gets the ``nvidia`` runtime (``nvidia-ctk``)."""
    if g is None or cfg.mode != "docker":
        return
    docker_runtime(name="Docker's NVIDIA runtime", configured=_has_docker_runtime())


def kind_suffix(h: Host, cfg: HostConfig) -> str:
    """The build-kind suffix of host ``h`` (any host of the run: build once compares kinds across
    hosts), "" for a CPU build; read from ``h``'s own facts."""
    if not cfg.cuda:
        return ""
    gpus = h.get_fact(NvidiaGpus)
    cuda = h.get_fact(CudaToolkit)
    try:
        archs = cfg.build.cuda_architectures or gpu.cuda_architectures(gpus)
        return "-" + gpu.cuda_release_kind(cuda or "0.0", archs)
    except gpu.GpuError:
        return "-cuda-unknown"  # gpu_host refuses such a host before it builds or receives anything


def fit_env_path(cfg: HostConfig, digest: str) -> str:
    return f"{cfg.service.config_dir}/gpu-fit/{digest}.env"


@dataclass(frozen=True)
class FitPin:
    """A CUDA host's pinned fit: the unit reads ``env_path`` and appends ``$LLAMA_GPU_FIT``."""

    digest: str
    env_path: str
    fit_cmd: list[str]


def fit_pin(cfg: HostConfig, g: GpuHost | None, planned: list[str], model_path: str, model_sha256: str) -> FitPin | None:
    """The fit to pin on a native CUDA host whose ``gpu_layers`` is 0 (None elsewhere: a number
    > 0 is in the unit's arguments as given). Named by the digest of its inputs, so the unit's
    text, and with it the release id, changes exactly when the fit's inputs do, and a rollback
    gets the fit of the release it reinstates (the files are kept)."""
    if g is None or cfg.mode != "native" or cfg.server.gpu_layers:
        return None
    try:
        cmd = gpu.fit_params_command(f"{cfg.release_dir}/bin/llama-fit-params", model_path, planned,
                                     cfg.gpu.fit_margin_mib)
    except gpu.GpuError as exc:
        raise DeployError(f"preflight refused host {host.name}: llama_server.extra_args: {exc}") from None
    digest = gpu.fit_inputs_digest(cfg.build.release_key(), model_sha256, cmd, g.gpus)
    return FitPin(digest, fit_env_path(cfg, digest), cmd)


def pinned(cfg: HostConfig, pin: FitPin | None, g: GpuHost | None) -> OperationMeta | None:
    """Run and pin llama.cpp's fit (:func:`roles.gpu.operations.fit_pinned`) where there is one to
    pin: as the service's user, in its unit's sandbox and limits, with its GPUs' device nodes
    created first."""
    if pin is None or g is None:
        return None
    return fit_pinned(name="Offload pinned from llama-fit-params", fit_cmd=pin.fit_cmd,
                      margin_mib=cfg.gpu.fit_margin_mib, unit=f"{cfg.service.name}.service",
                      env_path=pin.env_path, digest=pin.digest,
                      run_as=sandboxed_run(cfg.service.user, gpu.device_allow(list(g.gpus)), unit_limits(cfg)),
                      device_nodes=gpu.device_node_commands(x.index for x in g.gpus))


def manifest_fields(cfg: HostConfig, g: GpuHost | None, pin: FitPin | None) -> dict[str, object]:
    """What the deploy manifest records about the GPUs (nothing on a CPU host, so that its manifest
    stays as it was): the cards, the layers (a number, or "fit" with the file that pins it)."""
    if g is None:
        return {}
    return {"gpus": [f"{x.name} {x.uuid}" for x in g.gpus],
            "gpu_layers": str(cfg.server.gpu_layers) if cfg.server.gpu_layers else ("fit" if pin else "auto"),
            "gpu_pin_file": pin.env_path if pin else None}
