"""The build role's operations: compile a llama.cpp release on a host, bring it to the controller, ship it."""

from __future__ import annotations

import os
import posixpath
import shlex
from collections.abc import Generator
from pathlib import Path
from typing import IO, Any, cast

from pyinfra import host
from pyinfra.api import FileDownloadCommand, FunctionCommand, OperationError, operation
from pyinfra.facts.files import File

from llamadeploy import atomic
from llamadeploy.artifacts import ProgressReader
from llamadeploy.atomic import StagedUpload, VerifiedSha256
from llamadeploy.config import BuildConfig
from llamadeploy.roles.build.artifact import artifact_sha256, publish

#: the binaries of a release: the server, and the RPC worker its heads' layers run on
TARGETS = ("llama-server", "ggml-rpc-server", "llama-fit-params")


@operation()
def build_release(build: BuildConfig, release_dir: str, cache_dir: str,
                  compile: bool = True, host_defines: dict[str, str] | None = None) -> Generator[Any, None, None]:
    """
    Build ``llama-server`` for one release key and install it into ``release_dir``.

    + build: the host's build settings (version, source, CMake options)
    + release_dir: ``<prefix>/releases/<version>-<flags hash>``; created atomically
    + cache_dir: where sources, the build tree and ccache live on the host
    + compile: False on a host that receives the release built on another (build once)
    + host_defines: CMake options this host adds (a CUDA build's architectures, from its GPUs); they
      are recorded in ``BUILD-INFO`` and carried by the build kind, not the release key

    Nothing happens when the release directory already holds a binary: a release
    is immutable, and its name changes whenever version or flags change. The
    binary is installed into a temporary directory and renamed into place, so an
    interrupted build never leaves a half-release that ``current`` could point to.

    Each release key builds in its own tree (``<cache_dir>/build/<key>``), so ccache is told that
    paths under ``cache_dir`` are relative (``CCACHE_BASEDIR``): a release that differs only in its
    label or one option then reuses every object the other compiled, instead of missing on the
    other tree's absolute ``-I`` and ``-o`` paths.

    **Example:**

    .. code:: python

        build_release(name="Build llama.cpp", build=cfg.build,
                      release_dir=cfg.release_dir, cache_dir="/var/cache/llama.cpp")
    """
    binary = f"{release_dir}/bin/llama-server"
    if not compile:
        host.noop(f"llama.cpp release {build.release_key()} is built on another host of this kind")
        return
    if host.get_fact(File, path=binary):
        host.noop(f"llama.cpp release {build.release_key()} is already built")
        return

    q = shlex.quote
    src = f"{cache_dir}/src/{build.version}"
    if build.source == "tarball":
        tarball = f"{cache_dir}/src/{build.version}.tar.gz"
        yield f"mkdir -p {q(cache_dir)}/src"
        yield StagedUpload(str(build.tarball), tarball, local_path=str(build.tarball))
        yield f"rm -rf {q(src)} && mkdir -p {q(src)} && tar -xzf {q(tarball)} -C {q(src)}"
        top = f"{src}/{build.tarball_subdir}"
    else:
        yield (
            f"rm -rf {q(src)} && git clone --quiet --depth 1 --branch {q(build.version)} "
            f"{q(build.git_url)} {q(src)}"
        )
        top = src

    key = build.release_key()
    # the RPC worker only where the RPC backend is built (a user's GGML_RPC=OFF leaves it out); the
    # fit tool only in CUDA builds (the GPU role pins its result)
    opts = build.cmake_options() | (host_defines or {})
    targets = [t for t in TARGETS if (t != "ggml-rpc-server" or opts.get("GGML_RPC") == "ON")
               and (t != "llama-fit-params" or opts.get("GGML_CUDA") == "ON")]
    work = f"{cache_dir}/build/{key}"
    tmp = f"{release_dir}.partial"
    defines = " ".join(f"-D{k}={q(v)}" for k, v in opts.items())
    if build.ccache:
        defines += " -DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache"
    jobs = str(build.jobs) if build.jobs else "$(nproc)"
    info = " ".join(q(f"{k}={v}") for k, v in opts.items())
    yield " && ".join(
        [
            "set -e",
            f"export CCACHE_DIR={q(cache_dir)}/ccache CCACHE_BASEDIR={q(cache_dir)} CCACHE_COMPILERCHECK=content"
            " CCACHE_NOHASHDIR=1",
            *(["export PATH=\"$PATH:/usr/local/cuda/bin\""] if opts.get("GGML_CUDA") == "ON" else []),
            f"rm -rf {q(work)} {q(tmp)} && mkdir -p {q(cache_dir)}/build",
            f"cmake -S {q(top)} -B {q(work)} {defines} > {q(work)}.configure.log 2>&1"
            f" || {{ tail -n 40 {q(work)}.configure.log >&2; exit 1; }}",
            f"cmake --build {q(work)} --target {' '.join(targets)} -j {jobs} > {q(work)}.build.log 2>&1"
            f" || {{ tail -n 60 {q(work)}.build.log >&2; exit 1; }}",
            f"mkdir -p {q(tmp)}/bin",
            *(f"install -m 0755 {q(work)}/bin/{t} {q(tmp)}/bin/{t}" for t in targets),
            f"printf '%s\\n' {info} > {q(tmp)}/BUILD-INFO",
            f"sync -f {q(tmp)}/bin/llama-server",  # syncfs: the whole release is on disk before it is named
            f"mv -T {q(tmp)} {q(release_dir)}",
            f"sync -- {q(posixpath.dirname(release_dir))}",
            f"rm -rf {q(work)} {q(src)}",
        ]
    )


@operation()
def artifact_fetched(release_dir: str, cache_dir: str, controller_path: str, enabled: bool = True):
    """
    Pack the release this host built and bring it to the controller's cache, with its sha256.

    + release_dir: the built release on the host
    + cache_dir: the host's cache directory (where the tarball is packed)
    + controller_path: ``<controller cache>/releases/<key>/<kind>.tar.gz``
    + enabled: False on every host but the builder (each host runs the same operations)

    Nothing happens when the controller already has it. The tarball is packed on the
    host, hashed there, downloaded next to its final name and only named in the cache
    once the controller's hash of it equals the builder's (``artifact.publish``).
    """
    if not enabled:
        host.noop("not the builder of this release")
        return
    if artifact_sha256(Path(controller_path)):
        host.noop(f"the controller has {controller_path}")
        return
    q = shlex.quote
    remote = f"{cache_dir}/artifacts/{posixpath.basename(release_dir)}.tar.gz"
    yield (f"mkdir -p {q(cache_dir)}/artifacts && tar -C {q(release_dir)} -czf {q(remote)}.partial . && "
           f"mv -f {q(remote)}.partial {q(remote)} && sha256sum {q(remote)} > {q(remote)}.sha256")
    yield FunctionCommand(os.makedirs, (str(Path(controller_path).parent),), {"exist_ok": True})
    partial = f"{controller_path}.{host.name}.partial"
    yield FileDownloadCommand(remote, partial)
    yield FileDownloadCommand(f"{remote}.sha256", f"{partial}.sha256")
    yield FunctionCommand(publish, (partial, f"{partial}.sha256", controller_path), {})
    yield f"rm -f {q(remote)} {q(remote)}.sha256"


@operation()
def artifact_installed(release_dir: str, cache_dir: str, controller_path: str, builder: str,
                       enabled: bool = True):
    """
    Install a release built on another host of this kind: push the tarball, verify, unpack, name it.

    + release_dir: where the release goes on this host
    + cache_dir: the host's cache directory (upload staging)
    + controller_path: the artifact in the controller's cache
    + builder: the host that builds it in this run when the cache lacks it (for the message)
    + enabled: False on the host that compiles it, or has it already

    Read at execution, after the builder's operations: in one pyinfra run every host's
    operation N runs before any host's operation N+1, so the builder's artifact is in the
    cache by then. The tarball is verified against the controller's sha256 before it is
    unpacked into ``release_dir.partial``, which is renamed into place only when complete.
    """
    binary = f"{release_dir}/bin/llama-server"
    if not enabled:
        host.noop(f"release {posixpath.basename(release_dir)} is built here")
        return
    if host.get_fact(File, path=binary):
        host.noop(f"release {posixpath.basename(release_dir)} is already installed")
        return
    sha = artifact_sha256(Path(controller_path))
    if sha is None:
        if not host.state.is_executing:
            host.noop(f"{posixpath.basename(release_dir)} is shipped once {builder} has built it")
            return
        raise OperationError(f"no built release at {controller_path}: its builder {builder} did not produce one "
                             "(see its errors above)")
    q = shlex.quote
    fanned = fanout_path(cache_dir, release_dir)
    part = f"{release_dir}.partial"
    local = host.get_fact(VerifiedSha256, path=fanned)
    if local is not None and local.sha256 == sha:  # a fan-out brought it from the peers
        tmp = fanned
    else:
        tmp = f"{cache_dir}/artifacts/{posixpath.basename(release_dir)}.tar.gz.partial"
        yield f"mkdir -p {q(cache_dir)}/artifacts && rm -f {q(tmp)}"
        yield StagedUpload(cast(IO[Any], ProgressReader(controller_path, f"{host.name} release")), tmp,
                           local_path=controller_path)
    mismatch = q(f"sha256 mismatch for the release tarball {controller_path}: expected {sha}, got")
    yield (
        f"actual=$(sha256sum {q(tmp)} | cut -d' ' -f1); if [ \"$actual\" != {q(sha)} ]; then "
        f"rm -f {q(tmp)}; echo {mismatch} \"$actual\" >&2; exit 1; fi; "
        f"rm -rf {q(part)} && mkdir -p {q(part)} && tar -C {q(part)} -xzf {q(tmp)} && rm -f {q(tmp)} && "
        f"test -x {q(part)}/bin/llama-server && sync -f {q(part)}/bin/llama-server && "
        f"mv -T {q(part)} {q(release_dir)} && sync -- {q(posixpath.dirname(release_dir))} && "
        f"rm -f {q(fanned)} {q(atomic.record_path(fanned))}"
    )


def fanout_path(cache_dir: str, release_dir: str) -> str:
    """Where a fan-out puts a release tarball on a host (verified; removed once unpacked)."""
    return f"{cache_dir}/artifacts/{posixpath.basename(release_dir)}.tar.gz"
