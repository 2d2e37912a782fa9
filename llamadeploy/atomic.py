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

Each one compares first and calls ``host.noop`` when nothing differs. Every
rename is made durable: the staged file is fsynced before it, its directory after
(:func:`durable_rename`).

Large files (models, image tarballs, built releases) go through
:func:`verified_file`: uploaded to ``dest.partial``, hashed on the host, and only
renamed onto ``dest`` when the sha256 matches.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import secrets
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, cast

from pyinfra import host, logger
from pyinfra.api import FactBase, FileUploadCommand, OperationError, QuoteString, StringCommand, operation
from pyinfra.api.util import format_exception, get_file_sha1
from pyinfra.facts.files import File, Link, Sha1File
from pyinfra.facts.server import Home
from pyinfra.operations.util.files import chmod, chown, ensure_mode_int

from llamadeploy.artifacts import ProgressReader

SHA256_RE = re.compile(r"[0-9a-f]{64}")

#: suffix of staging files; never read by the service, removed on the next run
STAGE_SUFFIX = ".llamadeploy-stage"


def staging_path(dest: str) -> str:
    """Hidden sibling of ``dest``: same directory, so the final ``mv`` is a rename(2)."""
    head, tail = posixpath.split(dest)
    return posixpath.join(head, f".{tail}{STAGE_SUFFIX}")


def durable_rename(staged: str, dest: str) -> str:
    """Shell: fsync ``staged``, rename it onto ``dest``, fsync the directory.

    A rename is atomic but not durable: after a power cut the new name can point at a
    file whose data never reached the disk (an empty unit or key under its final name).
    ``sync FILE`` (coreutils) fsyncs the data first; ``sync DIR`` makes the rename stick.
    """
    q = shlex.quote
    return f"sync -- {q(staged)} && mv -f {q(staged)} {q(dest)} && sync -- {q(posixpath.dirname(dest) or '/')}"


class StagedUpload(FileUploadCommand):
    """pyinfra's upload to a staging path that fails only this host, saying why, and leaves no bytes.

    What pyinfra 3.10 does with a transfer that breaks:

    * one that dies with the connection (host unreachable or rebooting mid-transfer) raises
      ``EOFError`` or ``ConnectError`` out of its operation loop, which catches only ``OSError``
      and ``SSHException`` there: the whole run stops ("An internal exception occurred") and the
      other hosts are left half-deployed, whatever ``--fail-percent`` says;
    * OpenSSH's sftp-server reports ENOSPC as its generic ``SSH_FX_FAILURE``, so a full disk
      shows as ``OSError('Failure')``, and the partial file stays behind, filling the disk.

    Here any failure of the transfer fails this host like a failed command does. When the host
    still answers, the partial file is removed and the message compares the filesystem's free
    space with what was left to send ("no space left on device" when the rest cannot fit).
    """

    def __init__(self, src: Any, dest: str, local_path: str | None = None, remote_temp_filename: str | None = None,
                 **connector_arguments: Any):
        super().__init__(src, dest, remote_temp_filename=remote_temp_filename, **connector_arguments)
        self.local_path = local_path  #: controller file behind ``src``: its size tells a full disk

    def execute(self, state: Any, host: Any, connector_arguments: Any) -> bool:
        try:
            return bool(super().execute(state, host, connector_arguments))
        except Exception as exc:  # noqa: BLE001 - a broken transfer fails this host, never the run
            host.log_styled(self._why(host, connector_arguments, exc), fg="red", log_func=logger.error)
            return False

    def _why(self, host: Any, connector_arguments: Any, exc: Exception) -> str:
        q = shlex.quote
        folder = posixpath.dirname(self.dest) or "/"
        failed = f"upload to {host.name}:{self.dest} failed ({format_exception(exc)})"
        probe = (f"stat -c %s {q(self.dest)} 2>/dev/null || echo 0; df -PB1 {q(folder)} | awk 'NR==2{{print $4}}'; "
                 f"rm -f {q(self.dest)}" + (f" {q(self.remote_temp_filename)}" if self.remote_temp_filename else ""))
        try:
            ok, output = host.run_shell_command(StringCommand(probe), print_output=False, print_input=False,
                                                **connector_arguments)
        except Exception:  # noqa: BLE001 - no answer is the answer
            return f"{failed}; host {host.name} does not answer any more (unreachable or rebooting)"
        try:
            sent, free = (int(n) for n in output.stdout_lines[:2])
        except ValueError:
            ok = False
        if not ok:
            return f"{failed}; checking the partial file and free space failed too: {output.stderr[-300:]!r}"
        size = os.path.getsize(self.local_path) if self.local_path else None
        if size is not None and free < size - sent:
            return (f"no space left on device on host {host.name}: {folder} has {free >> 20} MiB free with "
                    f"{(size - sent) >> 20} MiB of {posixpath.basename(self.dest)} still to send; {failed}; "
                    "the partial file is removed")
        return f"{failed}; {folder} has {free >> 20} MiB free; the partial file is removed"


class NonceDigest(FactBase[str | None]):
    """sha256 of a fresh nonce followed by the file's content; None when there is no file.

    For secrets, a challenge-response instead of a hash: pyinfra prints fact commands at
    ``-vv`` and their output at ``-vvv``, and the host's process list shows every command
    line. Comparing ``Sha1File`` of a key file (pyinfra's way) printed a stable hash of the
    key; passing the expected hash in the command put it in ``ps``. Here the command holds
    only a random nonce and the path, and the output is a digest that is never the same
    twice, so nothing printed or listed can be matched with the key or with another run.
    """

    def command(self, path: str, nonce: str) -> StringCommand:
        return StringCommand(
            "test", "-f", QuoteString(path), "&&",
            StringCommand(f"{{ printf %s {shlex.quote(nonce)} && cat {shlex.quote(path)}; }} | sha256sum | cut -c1-64"),
            "||", "true",
        )

    def process(self, output: list[str]) -> str | None:
        return output[0] if output and SHA256_RE.fullmatch(output[0]) else None


def same_secret(path: str, src: IO[Any]) -> bool:
    """Whether ``path`` on the host holds exactly ``src``, by :class:`NonceDigest`."""
    nonce = secrets.token_hex(16)
    data = src.read()
    src.seek(0)
    want = hashlib.sha256(nonce.encode() + (data.encode() if isinstance(data, str) else data)).hexdigest()
    return host.get_fact(NonceDigest, path=path, nonce=nonce) == want


#: global arguments with which pyinfra uploads as the SSH user and copies into place as another
ESCALATIONS = ("_sudo", "_su_user", "_doas", "_dzdo")
#: the SSH user's private upload directory (in its home) while escalating
UPLOAD_DIR = ".llamadeploy-upload"


def private_upload(src: IO[Any], dest: str) -> Iterator[Any]:
    """Commands that upload ``src`` onto ``dest`` with nobody else able to read it in transit.

    As root, the SFTP upload writes into ``dest`` itself (created 0600 beforehand by the
    caller). Through sudo/su/doas, pyinfra uploads as the SSH user to a temp file in
    ``/tmp`` with the SFTP server's default mode (0644), then ``cp``s it: an API key or Hub
    token readable by every local user for the length of the transfer. Here the temp file
    lies in a 0700 directory of the SSH user's own home instead.
    """
    args: dict[str, Any] = dict(host.current_op_global_arguments or {})
    if not any(args.get(k) for k in ESCALATIONS):
        yield StagedUpload(src, dest)
        return
    unescalated: dict[str, Any] = {"_sudo": False, "_su_user": None, "_doas": False, "_dzdo": False}
    home = host.get_fact(Home, **unescalated)
    if not home or not home.startswith("/"):
        raise OperationError(f"cannot find the SSH user's home for a private upload (got {home!r})")
    updir = posixpath.join(home, UPLOAD_DIR)
    yield StringCommand("umask", "077", "&&", "mkdir", "-p", QuoteString(updir), "&&",
                        "chmod", "700", QuoteString(updir), **unescalated)
    yield StagedUpload(src, dest, remote_temp_filename=posixpath.join(updir, posixpath.basename(dest)))
    yield StringCommand("rmdir", "--ignore-fail-on-non-empty", QuoteString(updir), **unescalated)


@operation()
def put(src: IO[Any], dest: str, user: str = "root", group: str = "root", mode: str = "644",
        secret: bool = False, check: str | None = None):
    """
    Replace ``dest`` with the content of ``src`` by rename; fix owner/mode in place otherwise.

    + src: file-like object with the content
    + dest: remote path the service reads
    + user, group, mode: final owner and permissions
    + secret: compare by challenge-response (:class:`NonceDigest`), never by a hash of the content
    + check: a command that must accept the staged file before it replaces ``dest``, with
      ``{path}`` for its (quoted) path, e.g. ``haproxy -c -f {path}``; when it fails the staged
      file is removed and ``dest`` stays as it was

    **Example:**

    .. code:: python

        atomic.put(name="API key file (0600)", src=StringIO(key), dest="/etc/llama-server/api-key",
                   user="llama", group="llama", mode="600")
    """
    want_mode = ensure_mode_int(mode)
    assert want_mode is not None, "a mode is always given"
    remote = host.get_fact(File, path=dest)
    q = shlex.quote
    if secret:
        same = bool(remote) and same_secret(dest, src)
    else:
        same = bool(remote) and host.get_fact(Sha1File, path=dest) == get_file_sha1(src)
    if remote and same:
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
    yield from private_upload(src, stage)
    yield chown(stage, user, group)
    yield chmod(stage, want_mode)
    if check:
        yield f"{check.format(path=q(stage))} || {{ rc=$?; rm -f {q(stage)}; exit $rc; }}"
    yield durable_rename(stage, dest)


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
    yield f"rm -f {q(stage)} && ln -s {q(target)} {q(stage)} && mv -Tf {q(stage)} {q(path)} && sync -- {q(posixpath.dirname(path))}"


@operation()
def verified_file(src: str, dest: str, sha256: str, mode: str = "0644", present: HashState | None = None):
    """
    Upload a large file (a model) once, verify its sha256 on the host, then move it into place.

    + src: controller path
    + dest: final path on the host; the service reads only this one
    + sha256: expected hash of the content
    + mode: file mode of the installed file
    + present: what the caller found at ``dest`` this run (:class:`VerifiedSha256`), or None
      to read it here

    The upload goes to ``dest.partial``; only a file whose hash matches is renamed
    onto ``dest``. A mismatch deletes the partial file and fails the host with
    expected and actual hash, leaving the previous file (and the running service)
    untouched. A present file with the right hash is not uploaded again.

    **Example:**

    .. code:: python

        verified_file(name="Model", src="models/m.gguf",
                      dest="/var/lib/llama-server/models/m.gguf", sha256="a5fd...")
    """
    todo = already_in_place("verified_file", dest, sha256, present)
    if todo != "install":
        if todo:
            yield todo
        return
    q = shlex.quote
    tmp = f"{dest}.partial"
    yield f"rm -f {q(tmp)} {q(tmp)}.aria2"  # and a peer pull's leftovers (roles/transfer)
    # ProgressReader is a binary file object (RawIOBase), the IO pyinfra reads uploads from
    yield StagedUpload(cast(IO[Any], ProgressReader(src, f"{host.name} {dest.rsplit('/', 1)[-1]}")), tmp,
                       local_path=src)
    yield install_if_hash_matches(tmp, dest, sha256, mode, what=dest)


@dataclass(frozen=True)
class HashState:
    sha256: str
    #: the record next to the file vouches for this hash (size, inode, mtime, ctime unchanged)
    recorded: bool


def record_path(path: str) -> str:
    """Where the verified hash of ``path`` is recorded: a hidden sibling."""
    head, tail = posixpath.split(path)
    return posixpath.join(head, f".{tail}.sha256")


#: what identifies a file's version without reading it: size, inode, mtime and ctime (ns)
STAMP = "%s %i %y %z"


class VerifiedSha256(FactBase[HashState | None]):
    """sha256 of a large file, re-hashed only when it may have changed; None when missing.

    Hashing a multi-GB model on every run made no-op deploys slow. When the file was put
    in place, its size, inode, mtime and ctime were recorded with the verified hash
    (:func:`record_command`); while they are unchanged the recorded hash is the answer.
    Anything that rewrites, replaces or touches the file changes one of them (ctime cannot
    be set back by users). ``full`` hashes anyway (``llama_verify = "full"``).
    """

    def command(self, path: str, full: bool = False) -> str:
        q = shlex.quote
        p, r = q(path), q(record_path(path))
        hashed = f'sha=$(sha256sum < {p} | cut -c1-64)'
        current = '[ "$st" = "$(sed -n 1p ' + r + ' 2>/dev/null)" ] && rec=$(sed -n 2p ' + r + ' 2>/dev/null) && [ -n "$rec" ]'
        if full:
            body = f'{hashed}; if {current} && [ "$rec" = "$sha" ]; then echo "$sha recorded"; else echo "$sha hashed"; fi'
        else:
            body = f'if {current}; then echo "$rec recorded"; else {hashed}; echo "$sha hashed"; fi'
        return f"if [ -f {p} ]; then st=$(stat -c {q(STAMP)} -- {p}); {body}; fi"

    def process(self, output: list[str]) -> HashState | None:
        words = output[0].split() if output else []
        if len(words) == 2 and SHA256_RE.fullmatch(words[0]):
            return HashState(words[0], words[1] == "recorded")
        return None


def record_command(path: str, sha256: str) -> str:
    """Shell: record ``path``'s stamp with its verified ``sha256`` (by rename, synced)."""
    q = shlex.quote
    rec = record_path(path)
    tmp = f"{rec}.tmp"
    return (f"{{ stat -c {q(STAMP)} -- {q(path)} && echo {q(sha256)}; }} > {q(tmp)} && "
            f"{durable_rename(tmp, rec)}")


def already_in_place(op: str, dest: str, sha256: str, present: HashState | None) -> str | None:
    """For operations that put a verified file at ``dest``: refuse a malformed hash; when ``dest``
    already has it (found by the caller this run, or read here), say so with ``host.noop`` and
    return None, or return the command that records the hash for the next runs."""
    if not SHA256_RE.fullmatch(sha256 or ""):
        raise OperationError(f"{op} needs a sha256, got {sha256!r}")
    state = present or host.get_fact(VerifiedSha256, path=dest)
    if state is None or state.sha256 != sha256:
        return "install"
    if state.recorded:
        host.noop(f"{dest} already has sha256 {sha256[:12]}…")
        return None
    return record_command(dest, sha256)


def install_if_hash_matches(staged: str, dest: str, sha256: str, mode: str, what: str) -> str:
    """Shell: rename ``staged`` onto ``dest`` (via ``dest.partial``) only when its sha256 matches.

    Otherwise the staged bytes are deleted and the command fails naming ``what``
    and both hashes; ``dest`` (what the service reads) is never touched.
    """
    q = shlex.quote
    tmp = f"{dest}.partial"
    stage = "" if staged == tmp else f"mv -f {q(staged)} {q(tmp)} && "
    mismatch = q(f"sha256 mismatch for {what}: expected {sha256}, got")
    return (
        f"actual=$(sha256sum {q(staged)} | cut -d' ' -f1); "
        f"if [ \"$actual\" = {q(sha256)} ]; then {stage}chmod {q(mode)} {q(tmp)} && {durable_rename(tmp, dest)} "
        f"&& {record_command(dest, sha256)}; "
        f"else rm -f {q(staged)}; echo {mismatch} \"$actual\" >&2; exit 1; fi"
    )