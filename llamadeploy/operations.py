"""Operations pyinfra has no stock equivalent for.

Each one asks a fact first and calls ``host.noop`` when there is nothing to do,
so a second deploy with unchanged input reports zero changes.
"""

from __future__ import annotations

import shlex

from pyinfra import host
from pyinfra.api import FileUploadCommand, OperationError, operation
from pyinfra.facts.files import File, Sha256File

from llamadeploy.config import BuildConfig


@operation()
def build_release(build: BuildConfig, release_dir: str, cache_dir: str):
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
    info = "\\n".join(f"{k}={v}" for k, v in build.cmake_options().items())
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
            f"printf '{info}\\n' > {q(tmp)}/BUILD-INFO",
            f"mv -T {q(tmp)} {q(release_dir)}",
            f"rm -rf {q(work)} {q(src)}",
        ]
    )


@operation()
def verified_file(src: str, dest: str, sha256: str, mode: str = "0644", present: bool = False):
    """
    Upload a large file (a model) once, verify its sha256 on the host, then move it into place.

    + src: controller path
    + dest: final path on the host; the service reads only this one
    + sha256: expected hash of the content
    + mode: file mode of the installed file
    + present: the caller already found ``dest`` with this sha256 in this run (hashing a
      multi-GB model twice per run is the cost this saves)

    The upload goes to ``dest.partial``; only a file whose hash matches is renamed
    onto ``dest``. A mismatch deletes the partial file and fails the host with
    expected and actual hash, leaving the previous file (and the running service)
    untouched. A present file with the right hash is not uploaded again.

    **Example:**

    .. code:: python

        verified_file(name="Model", src="models/m.gguf",
                      dest="/var/lib/llama-server/models/m.gguf", sha256="a5fd...")
    """
    if present or host.get_fact(Sha256File, path=dest) == sha256:
        host.noop(f"{dest} already has sha256 {sha256[:12]}…")
        return
    if not sha256 or len(sha256) != 64:
        raise OperationError(f"verified_file needs a sha256, got {sha256!r}")
    q = shlex.quote
    tmp = f"{dest}.partial"
    from llamadeploy.artifacts import ProgressReader

    yield f"rm -f {q(tmp)}"
    yield FileUploadCommand(ProgressReader(src, f"{host.name} {dest.rsplit('/', 1)[-1]}"), tmp)
    yield install_if_hash_matches(tmp, dest, sha256, mode, what=dest)


def install_if_hash_matches(staged: str, dest: str, sha256: str, mode: str, what: str) -> str:
    """Shell: rename ``staged`` onto ``dest`` (via ``dest.partial``) only when its sha256 matches.

    Otherwise the staged bytes are deleted and the command fails naming ``what``
    and both hashes; ``dest`` (what the service reads) is never touched.
    """
    q = shlex.quote
    tmp = f"{dest}.partial"
    stage = "" if staged == tmp else f"mv -f {q(staged)} {q(tmp)} && "
    return (
        f"actual=$(sha256sum {q(staged)} | cut -d' ' -f1); "
        f"if [ \"$actual\" = {q(sha256)} ]; then {stage}chmod {mode} {q(tmp)} && mv -f {q(tmp)} {q(dest)}; "
        f"else rm -f {q(staged)}; echo \"sha256 mismatch for {what}: expected {sha256}, got $actual\" >&2; exit 1; fi"
    )


@operation()
def wait_healthy(url: str, timeout: int, unit: str):
    """
    Wait until ``url`` answers 200; fail with the unit's last journal lines otherwise.

    + url: the health endpoint as seen from the host itself
    + timeout: seconds to wait (llama-server answers 503 while it loads the model)
    + unit: systemd unit whose journal is shown on failure

    Run it right after a (re)start, gated with ``_if``: it always "changes", so an
    unconditional health gate would make every deploy look like a change.
    """
    q = shlex.quote
    yield (
        f"deadline=$(( $(date +%s) + {int(timeout)} )); code=000; "
        f"while [ $(date +%s) -lt $deadline ]; do "
        f"code=$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 {q(url)} || true); "
        f"[ \"$code\" = 200 ] && exit 0; sleep 1; done; "
        f"echo \"{unit}: {url} answered $code, not 200, within {int(timeout)}s; last journal lines:\" >&2; "
        f"journalctl -u {q(unit)} -n 40 --no-pager >&2; exit 1"
    )


@operation()
def check_flags(binary: str, args: list[str], image: str | None = None):
    """
    Fail before the unit changes if ``args`` holds a flag the installed binary does not know.

    + binary: path of the ``llama-server`` that the unit will run
    + args: the rendered argument vector

    Reads the binary's ``--help`` at execution time (after the build), so a
    renamed flag in a new llama.cpp release stops the deploy instead of
    crash-looping the service.
    """
    from llamadeploy.facts import ServerHelp
    from llamadeploy.tuning import unknown_flags

    if image:
        from llamadeploy.facts import ImageServerHelp

        accepted = host.get_fact(ImageServerHelp, image=image)
        binary = f"llama-server in {image}"
    else:
        accepted = host.get_fact(ServerHelp, binary=binary)
    if not accepted:
        raise OperationError(f"{binary} is missing or printed no --help")
    bad = unknown_flags(args, accepted)
    if bad:
        raise OperationError(f"{binary} does not accept {', '.join(bad)} (see its --help)")
    host.noop(f"all {sum(a.startswith('-') for a in args)} flags are known to {binary}")
    yield from ()  # an operation is a generator even when it has no command


@operation()
def hub_download(repo_id: str, repo_path: str, commit: str, sha256: str, dest: str, endpoint: str,
                 python: str, work_dir: str, token_file: str | None = None, present: bool = False):
    """
    Download one Hub file on the host with huggingface_hub, verify it, move it into place.

    + repo_id, repo_path, commit: what to fetch, pinned to a commit
    + sha256: expected hash (the repo's LFS sha256); checked after the download
    + dest: final path; the service reads only this one
    + endpoint: Hub or on-prem mirror (``HF_ENDPOINT``)
    + python: interpreter of the host's isolated huggingface_hub environment
    + work_dir: download directory on the same disk as ``dest``
    + token_file: host path of a 0600 token file; passed as ``HF_TOKEN_PATH``, never on a command line
    + present: the caller already found ``dest`` with this sha256 in this run

    A present file with the right hash means nothing to do. A killed earlier
    download's ``*.incomplete`` leftovers are removed first.
    """
    if present or host.get_fact(Sha256File, path=dest) == sha256:
        host.noop(f"{dest} already has sha256 {sha256[:12]}…")
        return
    q = shlex.quote
    env = f"HF_ENDPOINT={q(endpoint)} HF_HUB_DISABLE_XET=1 HF_HUB_DISABLE_TELEMETRY=1 HF_HOME={q(work_dir)}/home"
    env += f" HF_TOKEN_PATH={q(token_file)}" if token_file else " HF_HUB_DISABLE_IMPLICIT_TOKEN=1"
    script = (
        "import sys; from huggingface_hub import hf_hub_download as d; "
        "print(d(sys.argv[1], sys.argv[2], revision=sys.argv[3], local_dir=sys.argv[4]))"
    )
    yield f"mkdir -p {q(work_dir)} && find {q(work_dir)} -name '*.incomplete' -delete"
    yield f"env {env} {q(python)} -c {q(script)} {q(repo_id)} {q(repo_path)} {q(commit)} {q(work_dir)} >/dev/null"
    yield install_if_hash_matches(f"{work_dir}/{repo_path}", dest, sha256, "0644", what=f"{repo_id}/{repo_path}")


@operation()
def image_loaded(ref: str, tarball: str, sha256: str):
    """
    ``docker load`` a pushed image tarball unless ``ref`` is already there from this tarball.

    + ref: the image reference the tarball holds (``repo:tag``)
    + tarball: host path of the tarball, already verified by ``verified_file``
    + sha256: its hash, recorded in ``<tarball>.loaded`` so a changed tarball reloads
    """
    from pyinfra.facts.files import FileContents

    from llamadeploy.facts import DockerImageId

    # the tarball's content is guaranteed by the verified_file op right before; the
    # marker says which content was loaded, so no second hash of a large file here
    marker = host.get_fact(FileContents, path=f"{tarball}.loaded") or []
    if host.get_fact(DockerImageId, ref=ref) and [line.strip() for line in marker] == [sha256]:
        host.noop(f"{ref} is loaded from {tarball}")
        return
    q = shlex.quote
    yield f"docker load -q -i {q(tarball)} && echo {q(sha256)} > {q(tarball + '.loaded')}"


@operation()
def image_pulled(ref: str):
    """
    ``docker pull`` an image reference (tag or tag@digest) unless it is already on the host.

    + ref: what to pull; pin it with a digest so "already there" means "the same image"
    """
    from llamadeploy.facts import DockerImageId

    if host.get_fact(DockerImageId, ref=ref):
        host.noop(f"{ref} is present")
        return
    yield f"docker pull -q {shlex.quote(ref)}"


@operation()
def compose_down(project_dir: str, compose: str):
    """
    Stop and remove the compose project (switching to native mode); nothing if there is none.

    + project_dir: where the compose file lives
    + compose: the compose command (``docker-compose`` or ``docker compose``)
    """
    path = f"{project_dir}/docker-compose.yml"
    if not host.get_fact(File, path=path):
        host.noop(f"no compose project in {project_dir}")
        return
    q = shlex.quote
    yield f"cd {q(project_dir)} && {compose} down --remove-orphans && rm -f docker-compose.yml"


@operation()
def compose_running(project_dir: str, compose: str):
    """
    Start the compose project if its container is not running (after a manual stop, a reboot
    without restart policy, ...); nothing when it runs.

    + project_dir: where the compose file lives
    + compose: the compose command
    """
    from pyinfra.facts.server import Command

    q = shlex.quote
    state = host.get_fact(
        Command,
        command=f"cd {q(project_dir)} && docker inspect --format '{{{{.State.Running}}}}' "
        f"$({compose} ps -q) 2>/dev/null || true",
    )
    if (state or "").strip() == "true":
        host.noop("the container is running")
        return
    yield f"cd {q(project_dir)} && {compose} up -d --remove-orphans"
