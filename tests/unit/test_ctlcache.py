"""The controller cache: a hash or GGUF header is computed once, and again only when the file changed."""

from __future__ import annotations

import hashlib
import os

import pytest

from llamadeploy import ctlcache
from llamadeploy.gguf_meta import ModelMeta


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMADEPLOY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def counting(calls: list[str]):
    def compute(path: str) -> str:
        calls.append(path)
        return hashlib.sha256(open(path, "rb").read()).hexdigest()
    return compute


def test_hash_once_until_the_file_changes(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"one")
    calls: list[str] = []
    first = ctlcache.file_sha256(str(f), counting(calls))
    assert ctlcache.file_sha256(str(f), counting(calls)) == first == hashlib.sha256(b"one").hexdigest()
    assert len(calls) == 1
    # same size, new content, mtime set back: the inode differs (written by rename) -> hashed again
    st = f.stat()
    g = tmp_path / "new"
    g.write_bytes(b"two")
    os.replace(g, f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ctlcache.file_sha256(str(f), counting(calls)) == hashlib.sha256(b"two").hexdigest()
    # rewritten in place with a new mtime -> hashed again
    f.write_bytes(b"six")
    assert ctlcache.file_sha256(str(f), counting(calls)) == hashlib.sha256(b"six").hexdigest()
    assert len(calls) == 3


def test_corrupt_entry_is_recomputed(tmp_path, cache):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    calls: list[str] = []
    ctlcache.file_sha256(str(f), counting(calls))
    for entry in (cache / "hashes").iterdir():
        entry.write_text("{not json")
    assert ctlcache.file_sha256(str(f), counting(calls)) == hashlib.sha256(b"x").hexdigest()
    assert len(calls) == 2


META = ModelMeta("gemma3", 18, 32768, 1, 256, 256, 253_113_024, 512, True, frozenset({"<start_of_turn>"}))


def test_meta_round_trip_and_version(cache):
    reads: list[int] = []

    def read() -> ModelMeta:
        reads.append(1)
        return META

    sha = "a" * 64
    assert ctlcache.model_meta(sha, read) == META
    assert ctlcache.model_meta(sha, read) == META  # frozenset of markers survives JSON
    assert len(reads) == 1
    entry = cache / "gguf-meta" / f"{sha}.json"
    entry.write_text(entry.read_text().replace(f'"version": {ctlcache.META_VERSION}', '"version": 0'))
    assert ctlcache.model_meta(sha, read) == META
    assert len(reads) == 2


def test_unwritable_cache_only_costs_time(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LLAMADEPLOY_CACHE", str(blocker / "sub"))  # cannot mkdir under a file
    f = tmp_path / "m"
    f.write_bytes(b"y")
    calls: list[str] = []
    assert ctlcache.file_sha256(str(f), counting(calls)) == hashlib.sha256(b"y").hexdigest()
    assert ctlcache.model_meta("b" * 64, lambda: META) == META
