"""Atomic replacements of the files and links the service reads.

Why this exists: pyinfra's ``files.put``/``files.template`` write straight onto
the destination over SFTP when connected as root (and ``cp`` onto it under
sudo), and ``files.link`` removes the old link before creating the new one.
An interrupted deploy, or a service restart at the wrong moment, would then
see a half-written unit, key or compose file, or no ``current`` link at all.

These operations stage the new content next to the destination (same
directory, so same filesystem) with its final owner and mode, then ``rename``
it over the old one: a reader sees the old file or the new one, never a mix.
The staging file is created empty with mode 0600 before the upload, so a
secret is never readable by others, not even for the length of the transfer.

Each one compares first and calls ``host.noop`` when nothing differs.
"""

from __future__ import annotations

import posixpath
import shlex
from io import StringIO
from typing import IO, Any

from pyinfra import host
from pyinfra.api import FileUploadCommand, operation
from pyinfra.api.util import get_file_sha1, get_template
from pyinfra.facts.files import File, Link, Sha1File
from pyinfra.operations.util.files import chmod, chown, ensure_mode_int

#: suffix of staging files; never read by the service, removed on the next run
STAGE_SUFFIX = ".llamadeploy-stage"


def staging_path(dest: str) -> str:
    """Hidden sibling of ``dest``: same directory, so the final ``mv`` is a rename(2)."""
    head, tail = posixpath.split(dest)
    return posixpath.join(head, f".{tail}{STAGE_SUFFIX}")


@operation()
def put(src: IO[Any], dest: str, user: str = "root", group: str = "root", mode: str = "644"):
    """
    Replace ``dest`` with the content of ``src`` by rename; fix owner/mode in place otherwise.

    + src: file-like object with the content
    + dest: remote path the service reads
    + user, group, mode: final owner and permissions

    **Example:**

    .. code:: python

        atomic.put(name="API key file (0600)", src=StringIO(key), dest="/etc/llama-server/api-key",
                   user="llama", group="llama", mode="600")
    """
    want_mode = ensure_mode_int(mode)
    remote = host.get_fact(File, path=dest)
    q = shlex.quote
    if remote and host.get_fact(Sha1File, path=dest) == get_file_sha1(src):
        changed = False
        if (remote["user"], remote["group"]) != (user, group):
            yield chown(dest, user, group)
            changed = True
        if remote["mode"] != want_mode:
            yield chmod(dest, want_mode)
            changed = True
        if not changed:
            host.noop(f"{dest} is up to date")
        return

    stage = staging_path(dest)
    yield f"mkdir -p {q(posixpath.dirname(dest))} && rm -f {q(stage)} && (umask 077 && : > {q(stage)})"
    yield FileUploadCommand(src, stage)
    yield chown(stage, user, group)
    yield chmod(stage, want_mode)
    yield f"mv -f {q(stage)} {q(dest)}"


@operation()
def template(src: str, dest: str, user: str = "root", group: str = "root", mode: str = "644", **data: Any):
    """
    Render a jinja2 template (pyinfra's loader) and install it with :func:`put`.

    + src: local template path
    + dest: remote path the service reads
    + user, group, mode: final owner and permissions
    + data: template variables
    """
    rendered = get_template(src).render(data)
    yield from put._inner(StringIO(rendered), dest, user=user, group=group, mode=mode)


@operation()
def link(path: str, target: str):
    """
    Point the symlink ``path`` at ``target`` by renaming a new link over it.

    + path: the link (e.g. ``/opt/llama.cpp/current``)
    + target: what it should point to

    ``ln -sfn`` unlinks before it links; ``mv -T`` of a fresh link is one
    rename, so ``path`` always resolves to either the old or the new release.
    """
    current = host.get_fact(Link, path=path)
    if current and current.get("link_target") == target:
        host.noop(f"{path} already points to {target}")
        return
    q = shlex.quote
    stage = staging_path(path)
    yield f"rm -f {q(stage)} && ln -s {q(target)} {q(stage)} && mv -Tf {q(stage)} {q(path)}"
