"""The build role's operation: compile one llama.cpp release on the host."""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Generator
from typing import Any

from pyinfra import host
from pyinfra.api import FileUploadCommand, operation
from pyinfra.facts.files import File

from llamadeploy.config import BuildConfig


@operation()
def build_release(build: BuildConfig, release_dir: str, cache_dir: str) -> Generator[Any, None, None]:
    """
    Build ``llama-server`` for one release key and install it into ``release_dir``.

    + build: the host's build settings (version, source, CMake options)
    + release_dir: ``<prefix>/releases/<version>-<flags hash>``; created atomically
    + cache_dir: where sources, the build tree and ccache live on the host

    Nothing happens when the release directory already holds a binary: a release
    is immutable, and its name changes whenever version or flags change. The
    binary is installed into a temporary directory and renamed into place, so an
    interrupted build never leaves a half-release that ``current`` could point to.

    **Example:**

    .. code:: python

        build_release(name="Build llama.cpp", build=cfg.build,
                      release_dir=cfg.release_dir, cache_dir="/var/cache/llama.cpp")
    """
    binary = f"{release_dir}/bin/llama-server"
    if host.get_fact(File, path=binary):
        host.noop(f"llama.cpp release {build.release_key()} is already built")
        return

    q = shlex.quote
    src = f"{cache_dir}/src/{build.version}"
    if build.source == "tarball":
        tarball = f"{cache_dir}/src/{build.version}.tar.gz"
        yield f"mkdir -p {q(cache_dir)}/src"
        yield FileUploadCommand(str(build.tarball), tarball)
        yield f"rm -rf {q(src)} && mkdir -p {q(src)} && tar -xzf {q(tarball)} -C {q(src)}"
        top = f"{src}/{build.tarball_subdir}"
    else:
        yield (
            f"rm -rf {q(src)} && git clone --quiet --depth 1 --branch {q(build.version)} "
            f"{q(build.git_url)} {q(src)}"
        )
        top = src

    key = build.release_key()
    work = f"{cache_dir}/build/{key}"
    tmp = f"{release_dir}.partial"
    defines = " ".join(f"-D{k}={q(v)}" for k, v in build.cmake_options().items())
    if build.ccache:
        defines += " -DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache"
    jobs = str(build.jobs) if build.jobs else "$(nproc)"
    info = " ".join(q(f"{k}={v}") for k, v in build.cmake_options().items())
    yield " && ".join(
        [
            "set -e",
            f"export CCACHE_DIR={q(cache_dir)}/ccache CCACHE_COMPILERCHECK=content CCACHE_NOHASHDIR=1",
            f"rm -rf {q(work)} {q(tmp)} && mkdir -p {q(cache_dir)}/build",
            f"cmake -S {q(top)} -B {q(work)} {defines} > {q(work)}.configure.log 2>&1"
            f" || {{ tail -n 40 {q(work)}.configure.log >&2; exit 1; }}",
            f"cmake --build {q(work)} --target llama-server -j {jobs} > {q(work)}.build.log 2>&1"
            f" || {{ tail -n 60 {q(work)}.build.log >&2; exit 1; }}",
            f"mkdir -p {q(tmp)}/bin",
            f"install -m 0755 {q(work)}/bin/llama-server {q(tmp)}/bin/llama-server",
            f"printf '%s\\n' {info} > {q(tmp)}/BUILD-INFO",
            f"sync -f {q(tmp)}/bin/llama-server",  # syncfs: the whole release is on disk before it is named
            f"mv -T {q(tmp)} {q(release_dir)}",
            f"sync -- {q(posixpath.dirname(release_dir))}",
            f"rm -rf {q(work)} {q(src)}",
        ]
    )
