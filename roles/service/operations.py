"""The service role's operation: refuse flags the installed binary does not know."""

from __future__ import annotations

import shlex
from collections.abc import Generator
from typing import Any

from pyinfra import host
from pyinfra.api import OperationError, operation

from llamadeploy.chat_template import template_problem
from llamadeploy.roles.service.facts import ServerHelp, ServerTemplates, ServerVersion
from llamadeploy.tuning import flag_names, unknown_flags


@operation()
def check_flags(binary: str, args: list[str]) -> Generator[Any, None, None]:
    """
    Fail before ``current`` and the unit change if ``binary`` does not run or does not know ``args``.

    + binary: path of the ``llama-server`` in the release the unit will run
    + args: the rendered argument vector

    Reads the binary's ``--help`` at execution time (after the build), so a
    renamed flag in a new llama.cpp release stops the deploy instead of
    crash-looping the service. A built-in ``--chat-template`` name must be in the
    binary's list too (llama-server would start and render the name as text).

    **Example:**

    .. code:: python

        check_flags(name="Flags known", binary="/opt/llama.cpp/current/bin/llama-server",
                    args=["--port", "8080"])
    """
    version = host.get_fact(ServerVersion, binary=binary) or ""
    if not version and not host.state.is_executing:
        # pyinfra without -y runs operations once to detect changes, before the release is built
        host.noop(f"{binary} is checked once the release is built")
        return
    if not version.startswith("version:") and "\nversion:" not in version:
        raise OperationError(f"{binary} does not run here: --version printed {version[:300]!r}")
    accepted = host.get_fact(ServerHelp, binary=binary)
    if not accepted:
        raise OperationError(f"{binary} is missing or printed no --help")
    bad = unknown_flags(args, accepted)
    if bad:
        raise OperationError(f"{binary} does not accept {', '.join(bad)} (see its --help)")
    problem = template_problem(args, host.get_fact(ServerTemplates, binary=binary), binary)
    if problem:
        raise OperationError(problem)
    host.noop(f"all {len(flag_names(args))} flags are known to {binary}")
    yield from ()  # an operation is a generator even when it has no command


@operation()
def restarted(unit: str, lines: int = 30) -> Generator[Any, None, None]:
    """
    Restart ``unit``; when systemd's start job fails, fail with the unit's state and its journal's
    last lines, so the run names why (``systemctl`` alone says only "see systemctl status").

    + unit: the systemd unit
    + lines: how many journal lines the failure shows

    Always a change when it runs: callers gate it with ``_if`` (an input changed). The state is
    read on the host at the moment of the failure; by the time an operator looks, the unit may
    have been restarted by its own ``Restart=`` and the journal moved on.

    **Example:**

    .. code:: python

        restarted(name="Restart for a changed unit", unit="llama-server.service")
    """
    u = shlex.quote(unit)
    yield (f"systemctl restart {u} && exit 0; rc=$?; {{ echo {shlex.quote(unit + ' did not start; its state and last log lines:')}; "
           f"systemctl show -p ActiveState -p SubState -p Result -p ExecMainStatus -p NRestarts {u}; "
           f"journalctl -u {u} -n {int(lines)} --no-pager -o short-precise; }} >&2; exit $rc")
