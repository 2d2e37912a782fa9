"""Controller-side artifacts (model files, source tarballs): hashing with a cache.

Hashing a multi-GB model on every deploy of every host would dominate a no-op
run, so the hash is computed once per file and kept in the controller's cache
(:mod:`llamadeploy.ctlcache`) until the file changes.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str) -> str:
    """sha256 of a controller file, cached across runs on (path, size, mtime, inode)."""
    from llamadeploy import ctlcache

    return ctlcache.file_sha256(path, _sha256)


class ProgressReader(io.RawIOBase):
    """A controller file handed to pyinfra's upload, showing bytes sent and rate while it reads.

    pyinfra's ``FileUploadCommand`` accepts a file object; SFTP reads it in
    chunks, so counting reads is counting bytes sent. The file opens on first
    use and closes at EOF, so the object can be built at prepare time.
    """

    def __init__(self, path: str, label: str):
        super().__init__()
        self.path, self.label = path, label
        self._f: io.BufferedReader | None = None
        self._bar = None

    def __repr__(self) -> str:
        return self.path

    def _open(self) -> io.BufferedReader:
        if self._f is None or self._f.closed:
            from tqdm.auto import tqdm

            self._f = open(self.path, "rb")
            self._bar = tqdm(total=os.path.getsize(self.path), unit="B", unit_scale=True, unit_divisor=1024,
                             desc=self.label, file=sys.stderr, mininterval=1.0)
        return self._f

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        f = self._open()
        new = f.seek(pos, whence)
        if self._bar is not None:
            self._bar.n = new
        return new

    def tell(self) -> int:
        return self._open().tell()

    def read(self, size: int = -1) -> bytes:
        data = self._open().read(size)
        if self._bar is not None:
            self._bar.update(len(data))
        if not data or size < 0:
            self.close()
        return data

    def readinto(self, buffer) -> int:  # RawIOBase protocol
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._f is not None:
            self._f.close()
        super().close()
