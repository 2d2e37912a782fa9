"""The firewall role's operations: load our nftables table, or remove it."""

from __future__ import annotations

import shlex

from pyinfra import host
from pyinfra.api import operation

from llamadeploy.roles.firewall.facts import NftTableComment


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
    Delete ``table inet TABLE`` if it is loaded.

    + table: the table's name
    """
    if host.get_fact(NftTableComment, table=table) is None:
        host.noop(f"no nftables table {table}")
        return
    yield f"nft delete table inet {shlex.quote(table)}"
