"""The model role's own operations: a host downloads a Hub file itself (``distribution: host``);
content staged or kept by sha256 is linked into place at a switch or a rollback, and what the
name held is kept for the releases that ran it."""

from __future__ import annotations

import posixpath
import shlex

from pyinfra import host
from pyinfra.api import OperationError, operation

from llamadeploy.atomic import (
    HashState,
    VerifiedSha256,
    already_in_place,
    durable_rename,
    install_if_hash_matches,
    record_command,
    staging_path,
)


@operation()
def hub_download(repo_id: str, repo_path: str, commit: str, sha256: str, dest: str, endpoint: str,
                 python: str, work_dir: str, token_file: str | None = None, present: HashState | None = None):
    """
    Download one Hub file on the host with huggingface_hub, verify it, move it into place.

    + repo_id, repo_path, commit: what to fetch, pinned to a commit
    + sha256: expected hash (the repo's LFS sha256); checked after the download
    + dest: final path; the service reads only this one
    + endpoint: Hub or on-prem mirror (``HF_ENDPOINT``)
    + python: interpreter of the host's isolated huggingface_hub environment
    + work_dir: download directory on the same disk as ``dest``
    + token_file: host path of a 0600 token file; passed as ``HF_TOKEN_PATH``, never on a command line
    + present: what the caller found at ``dest`` this run (``atomic.VerifiedSha256``), or None

    A present file with the right hash means nothing to do. A killed earlier
    download's ``*.incomplete`` leftovers are removed first.
    """
    todo = already_in_place("hub_download", dest, sha256, present)
    if todo != "install":
        if todo:
            yield todo
        return
    q = shlex.quote
    env = f"HF_ENDPOINT={q(endpoint)} HF_HUB_DISABLE_XET=1 HF_HUB_DISABLE_TELEMETRY=1 HF_HOME={q(work_dir)}/home"
    env += f" HF_TOKEN_PATH={q(token_file)}" if token_file else " HF_HUB_DISABLE_IMPLICIT_TOKEN=1"
    script = (
        "import sys; from huggingface_hub import hf_hub_download as d; "
        "print(d(sys.argv[1], sys.argv[2], revision=sys.argv[3], local_dir=sys.argv[4]))"
    )
    yield f"mkdir -p {q(work_dir)} && find {q(work_dir)} -name '*.incomplete' -delete"
    yield _token_gone_on_failure(
        f"env {env} {q(python)} -c {q(script)} {q(repo_id)} {q(repo_path)} {q(commit)} {q(work_dir)} >/dev/null",
        token_file)
    yield _token_gone_on_failure(
        install_if_hash_matches(f"{work_dir}/{repo_path}", dest, sha256, "0644", what=f"{repo_id}/{repo_path}"),
        token_file)


def _token_gone_on_failure(command: str, token_file: str | None) -> str:
    """Shell: ``command``, and when it fails, the token file goes before the run stops. A failed
    step ends pyinfra's run on the host before the operation that removes the token, which would
    then stay on the host until the next successful download (pure)."""
    if not token_file:
        return command
    return f"( {command} ) || {{ rm -f {shlex.quote(token_file)}; exit 1; }}"


def kept_path(kept_dir: str, sha256: str, name: str) -> str:
    """Where a model file's earlier content is kept: ``<kept_dir>/<sha256>/<name>`` (a hard link)."""
    return posixpath.join(kept_dir, sha256, name)


def _keep_command(path: str, sha256: str, kept_dir: str) -> str:
    """Shell: hard-link ``path`` (verified to hold ``sha256``) into ``kept_dir``; no byte is copied."""
    q = shlex.quote
    k = kept_path(kept_dir, sha256, posixpath.basename(path))
    return f"mkdir -p {q(posixpath.dirname(k))} && ln -f {q(path)} {q(k)}"


@operation()
def restored(dest: str, sha256: str, kept_dir: str, stop: str | None = None):
    """
    Put the kept content ``sha256`` back at ``dest`` by link and rename (a rollback, or a deploy
    of a model the host kept); what ``dest`` holds now is kept aside first, so going back and
    forth between two contents of one file name never needs a transfer.

    + dest: the model file path the release's unit or compose file names
    + sha256: the content the release ran
    + kept_dir: ``<model_dir>/.kept``
    + stop: the command that stops the server reading ``dest`` (its unit, its container), run
      first when the content changes: the release running now never has other content under the
      name it loaded (a crash before its restart would load it with its own flags, ungated); the
      start or restart that follows the switch brings up the release that runs this content
    """
    now = host.get_fact(VerifiedSha256, path=dest)
    if now is not None and now.sha256 == sha256:
        host.noop(f"{dest} holds sha256 {sha256[:12]}…")
        return
    k = kept_path(kept_dir, sha256, posixpath.basename(dest))
    kept = host.get_fact(VerifiedSha256, path=k)
    if (kept is None or kept.sha256 != sha256) and not host.state.is_executing:
        # a check for changes before execution: content staged by this very run is not there yet
        host.noop(f"{posixpath.basename(dest)} is linked from {kept_dir} when the run executes")
        return
    if kept is None or kept.sha256 != sha256:
        raise OperationError(f"no intact copy of {posixpath.basename(dest)} (sha256 {sha256[:12]}…) kept in {kept_dir}")
    q = shlex.quote
    tmp = staging_path(dest)  # not dest.partial: a fan-out pull resumes into that name
    aside = f"{_keep_command(dest, now.sha256, kept_dir)} && " if now is not None else ""
    records = [record_command(dest, sha256), record_command(k, sha256)]
    if now is not None:
        records.append(record_command(kept_path(kept_dir, now.sha256, posixpath.basename(dest)), now.sha256))
    if stop:  # stopped or not (none running), the switch goes on: the start that follows is the same
        yield f"{stop} || true"
    yield f"{aside}ln -f {q(k)} {q(tmp)} && {durable_rename(tmp, dest)} && {' && '.join(records)}"
