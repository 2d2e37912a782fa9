"""The firewall role's operations: load our nftables table, or remove it."""

from __future__ import annotations

import shlex

from pyinfra import host
from pyinfra.api import operation
from pyinfra.facts.files import FileContents

from llamadeploy import units
from llamadeploy.roles.firewall.facts import NftTableComment
from llamadeploy.units import UNIT_HEADER

#: how every table the deploy loads begins its comment (its rules' digest follows): the mark that a
#: table of that name is the deploy's, as a unit's first line is (llamadeploy.units). The kernel's
#: table is the only place the fence lives, so the mark sits on it, not in a record beside it.
MARK = "llamadeploy "


def is_ours(comment: str | None) -> bool:
    """Whether a loaded table's comment (the ``NftTableComment`` fact) is the deploy's mark (pure)."""
    return comment is not None and comment.startswith(MARK)


@operation()
def table_loaded(path: str, table: str, digest: str):
    """
    Load the rules file ``path`` when the kernel's ``table inet TABLE`` is missing or older.

    + path: the rules file (it replaces the whole table in one nft transaction)
    + table: the table's name
    + digest: the comment the rules file gives the table; equal means loaded and current

    The kernel's ruleset is the truth, not the file: a ruleset flushed by hand or a
    reboot without the service started is found and loaded again.
    """
    if host.get_fact(NftTableComment, table=table) == digest:
        host.noop(f"nftables table {table} is loaded and current")
        return
    yield f"nft -f {shlex.quote(path)}"


@operation()
def table_removed(table: str):
    """
    Delete ``table inet TABLE`` if it is loaded and the deploy's.

    + table: the table's name

    A table of that name without the deploy's mark in its comment (:data:`MARK`) is someone
    else's, made under a name the deploy would use: it stays.
    """
    comment = host.get_fact(NftTableComment, table=table)
    if comment is None:
        host.noop(f"no nftables table {table}")
        return
    if not is_ours(comment):
        host.noop(f"nftables table {table} is not the deploy's (its comment {comment!r} lacks {MARK.strip()!r}): "
                  "left alone")
        return
    yield f"nft delete table inet {shlex.quote(table)}"


@operation()
def dropin_removed(path: str):
    """
    Delete the drop-in ``path`` if it is the deploy's: its first line is the header every file
    the deploy writes under ``/etc/systemd/system`` begins with.

    + path: the drop-in (``nftables.service.d/<table>.conf``, ``<unit>.service.d/llamadeploy-fence.conf``)

    An operator's file under that name (a site policy named like ours) is theirs: it stays.
    """
    lines = host.get_fact(FileContents, path=path)
    if not lines:  # absent (or empty: not ours either)
        host.noop(f"no drop-in {path} of the deploy's")
        return
    if not units.has_header(lines[0]):
        host.noop(f"{path} is not the deploy's (its first line is not {UNIT_HEADER!r}): left alone")
        return
    yield f"rm -f -- {shlex.quote(path)}"
