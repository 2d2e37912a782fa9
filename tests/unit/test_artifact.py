"""Build once, ship many: host kinds and the controller's cache of built releases."""

from __future__ import annotations

import hashlib

import pytest

from llamadeploy.roles.build.artifact import artifact_path, artifact_sha256, host_kind, publish


def test_kind_separates_what_a_binary_depends_on():
    deb = {"name": "Debian", "major": 12}
    assert host_kind(deb, "x86_64", "abc", native=True) == "debian12-x86_64-cpuabc"
    assert host_kind(deb, "x86_64", "abc", native=False) == "debian12-x86_64-portable"
    assert host_kind(deb, "x86_64", "abc", True) != host_kind(deb, "x86_64", "def", True)  # other CPU flags
    assert host_kind(deb, "aarch64", "abc", False) != host_kind({"name": "Ubuntu", "major": 24}, "aarch64", "abc", False)


def test_publish_names_the_tarball_only_with_the_builders_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMADEPLOY_CACHE", str(tmp_path / "cache"))
    dest = artifact_path("b1-k", "debian12-x86_64-portable")
    dest.parent.mkdir(parents=True)
    assert artifact_sha256(dest) is None
    part = tmp_path / "dl.partial"
    part.write_bytes(b"tarball")
    good = hashlib.sha256(b"tarball").hexdigest()
    (tmp_path / "dl.sha256").write_text(f"{good}  /var/cache/x.tar.gz\n")
    publish(str(part), str(tmp_path / "dl.sha256"), str(dest))
    assert artifact_sha256(dest) == good and dest.read_bytes() == b"tarball" and not part.exists()

    part.write_bytes(b"corrupted in transit")
    (tmp_path / "dl.sha256").write_text(f"{good}  x\n")
    other = artifact_path("b1-k", "debian12-aarch64-portable")
    with pytest.raises(RuntimeError, match="sha256 .* on the controller, .* on the builder"):
        publish(str(part), str(tmp_path / "dl.sha256"), str(other))
    assert artifact_sha256(other) is None and not other.exists() and not part.exists()
