"""The model role's own operation: a host downloads a Hub file itself (``distribution: host``)."""

from __future__ import annotations

import shlex

from pyinfra.api import operation

from llamadeploy.atomic import HashState, already_in_place, install_if_hash_matches


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
    yield f"env {env} {q(python)} -c {q(script)} {q(repo_id)} {q(repo_path)} {q(commit)} {q(work_dir)} >/dev/null"
    yield install_if_hash_matches(f"{work_dir}/{repo_path}", dest, sha256, "0644", what=f"{repo_id}/{repo_path}")
