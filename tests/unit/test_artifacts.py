"""Controller artifacts: hashing cache and the progress-reporting upload reader."""

import hashlib

from llamadeploy.artifacts import ProgressReader, file_sha256


def test_progress_reader_streams_exact_bytes(tmp_path, capsys):
    src = tmp_path / "m.gguf"
    payload = bytes(range(256)) * 5000
    src.write_bytes(payload)
    reader = ProgressReader(str(src), "host m.gguf")
    reader.seek(0)  # pyinfra rewinds before sending
    chunks = []
    while chunk := reader.read(32768):  # how paramiko's putfo reads
        chunks.append(chunk)
    assert b"".join(chunks) == payload
    assert reader.closed
    err = capsys.readouterr().err
    assert "host m.gguf" in err and "100%" in err


def test_file_sha256(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    assert file_sha256(str(p)) == hashlib.sha256(b"abc").hexdigest()
