"""Controller-side model fetching against a real local Hub-compatible server (real HTTP).

These exercise ``llamadeploy.models`` as deploy.py calls it, with huggingface_hub
talking to ``tests/harness/hfserver.py``. No host is involved; the end-to-end
tests in tests/e2e/test_hub.py cover the hosts.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from llamadeploy.config import ModelConfig
from llamadeploy.roles.model.source import ModelError, download, resolve
from llamadeploy.sandbox.assets import MODEL_SHA256, MODEL_SIZE
from tests.conftest import LOCAL_TIMEOUT, TINY


def spec(env, **kw) -> ModelConfig:
    return ModelConfig.model_validate({"hf_endpoint": env["endpoint"], **kw})


def gets(hub, repo):
    return [g for g in hub.gets if g[0].startswith(repo + "/")]


def test_resolve_pins_commit_and_lfs_sha256(hub, hub_env):
    art = resolve(spec(hub_env, repo_id="llamactl-test/gemma-3-270m-GGUF", quant="Q4_K_M"))
    assert len(art.commit) == 40 and art.commit == hub.repos["llamactl-test/gemma-3-270m-GGUF"].commit
    assert [(f.name, f.size, f.sha256) for f in art.files] == [(TINY, MODEL_SIZE, MODEL_SHA256)]
    assert art.alias == "gemma-3-270m-q4_k_m"


def test_a_listed_name_no_inventory_could_give_is_refused_before_any_download(hub, hub_env):
    """The name comes from the Hub's listing (picked by quant), not the inventory: it is checked
    as an inventory's llama_model.filename is, before it reaches a unit or a shell."""
    before = len(gets(hub, "llamactl-test/hostile-name"))
    with pytest.raises(ModelError, match=r"^llamactl-test/hostile-name: the listed file 'gemma\$\(reboot\)-Q8_0.gguf' "
                                         r"must be a relative path of letters, digits"):
        resolve(spec(hub_env, repo_id="llamactl-test/hostile-name", quant="Q8_0"))
    assert len(gets(hub, "llamactl-test/hostile-name")) == before


def test_download_once_verified_then_cached(hub, hub_env):
    s = spec(hub_env, repo_id="llamactl-test/gemma-3-270m-GGUF", filename=TINY)
    before = len(gets(hub, "llamactl-test/gemma-3-270m-GGUF"))
    art = download(resolve(s), s)
    assert os.path.getsize(art.first.local) == MODEL_SIZE
    assert len(gets(hub, "llamactl-test/gemma-3-270m-GGUF")) == before + 1
    again = download(resolve(s), s)
    assert again.first.local == art.first.local
    assert len(gets(hub, "llamactl-test/gemma-3-270m-GGUF")) == before + 1  # zero bytes the second time


def test_wrong_hash_is_refused_and_evicted(hub, hub_env):
    s = spec(hub_env, repo_id="llamactl-test/corrupt", filename=TINY)
    with pytest.raises(ModelError) as exc:
        download(resolve(s), s)
    msg = str(exc.value)
    assert f"sha256 mismatch for llamactl-test/corrupt/{TINY}: expected {MODEL_SHA256}, got " in msg
    assert not list(hub_env["cache"].rglob(TINY)), "bad bytes left in the cache"


def test_pinned_sha256_must_match_hub(hub, hub_env):
    with pytest.raises(ModelError, match="but llama_model.sha256 pins 0000"):
        resolve(spec(hub_env, repo_id="llamactl-test/gemma-3-270m-GGUF", filename=TINY, sha256="0" * 64))


def test_interrupted_download_resumes(hub, hub_env):
    s = spec(hub_env, repo_id="llamactl-test/flaky", filename=TINY)
    art = download(resolve(s), s)
    assert art.first.sha256 == MODEL_SHA256
    ranges = [r for _, r in gets(hub, "llamactl-test/flaky")]
    assert ranges[0] is None and ranges[1].startswith("bytes="), ranges


def test_orphan_incomplete_blob_removed(hub, hub_env):
    blobs = hub_env["cache"] / "models--llamactl-test--other-name" / "blobs"
    blobs.mkdir(parents=True)
    orphan = blobs / "deadbeef.incomplete"
    orphan.write_bytes(b"x" * 1000)
    s = spec(hub_env, repo_id="llamactl-test/other-name", filename="gemma-other.gguf")
    download(resolve(s), s)
    assert not orphan.exists()


def test_gated_without_token_says_how(hub, hub_env):
    with pytest.raises(ModelError) as exc:
        resolve(spec(hub_env, repo_id="llamactl-test/gemma-3-270m-gated", quant="Q4_K_M"))
    msg = str(exc.value)
    assert "llamactl-test/gemma-3-270m-gated" in msg and "is gated (401) and no token was given" in msg
    assert "llama_model.hf_token_file" in msg and "HF_TOKEN" in msg


def test_gated_with_token_file_and_split_parts(hub, hub_env):
    art = resolve(spec(hub_env, repo_id="llamactl-test/gemma-3-270m-gated", quant="Q4_K_M",
                       hf_token_file=hub_env["token_file"]))
    assert [f.name for f in art.files] == ["gemma-3-270m-q4_k_m-00001-of-00002.gguf",
                                           "gemma-3-270m-q4_k_m-00002-of-00002.gguf"]
    assert art.alias == "gemma-3-270m-q4_k_m"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"repo_id": "llamactl-test/nope", "filename": TINY}, "llamactl-test/nope not found at http://127.0.0.1:18090"),
        ({"repo_id": "llamactl-test/gemma-3-270m-GGUF", "filename": "x.gguf"},
         "llamactl-test/gemma-3-270m-GGUF has no file 'x.gguf' (its .gguf files: gemma-3-270m-q4_k_m.gguf)"),
        ({"repo_id": "llamactl-test/gemma-3-270m-GGUF", "filename": TINY, "revision": "v9"},
         "llamactl-test/gemma-3-270m-GGUF has no revision 'v9' at http://127.0.0.1:18090"),
        ({"repo_id": "llamactl-test/gemma-3-270m-GGUF", "quant": "Q8_0"}, "has no .gguf file for quant 'Q8_0'"),
    ],
)
def test_missing_repo_file_revision(hub, hub_env, kw, message):
    with pytest.raises(ModelError) as exc:
        resolve(spec(hub_env, **kw))
    assert message in str(exc.value)


def test_controller_disk_too_small_refused_before_download(hub, hub_env, tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=True, timeout=LOCAL_TIMEOUT)
    try:
        monkeypatch.setenv("HF_HUB_CACHE", str(small / "hub"))
        s = spec(hub_env, repo_id="llamactl-test/other-name", filename="gemma-other.gguf")
        before = len(hub.gets)
        with pytest.raises(ModelError) as exc:
            download(resolve(s), s)
        assert f"not enough disk on the controller: {small} has 64 MiB free, needs " in str(exc.value)
        assert len(hub.gets) == before  # refused before any byte was fetched
    finally:
        subprocess.run(["umount", str(small)], check=True, timeout=LOCAL_TIMEOUT)
