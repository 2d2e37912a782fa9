"""What the service role reads from a host: the installed binary's ``--help``."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase

from llamadeploy.chat_template import parse_builtin_templates
from llamadeploy.facts import parse_help_flags


class ServerHelp(FactBase[frozenset[str]]):
    """The long options the installed ``llama-server`` accepts, read from its ``--help``.

    Flags change between llama.cpp releases (``--mlock``/``--no-mmap`` became
    ``--load-mode``); we check what we render against the binary, not memory.
    """

    def command(self, binary: str) -> str:
        q = shlex.quote(binary)
        return f"test -x {q} && {q} --help 2>&1 || true"

    def process(self, output: list[str]) -> frozenset[str]:
        return parse_help_flags(output)


class ServerTemplates(FactBase[frozenset[str]]):
    """The built-in chat template names the installed ``llama-server`` lists in its ``--help``."""

    def command(self, binary: str) -> str:
        q = shlex.quote(binary)
        return f"test -x {q} && {q} --help 2>&1 || true"

    def process(self, output: list[str]) -> frozenset[str]:
        return parse_builtin_templates(output)


class ServerVersion(FactBase[str]):
    """What ``llama-server --version`` prints: proof that the binary loads and runs on this host
    (its libraries resolve, its instructions exist on this CPU) before it becomes current."""

    def command(self, binary: str) -> str:
        q = shlex.quote(binary)
        return f"test -x {q} && {q} --version 2>&1 || true"

    def process(self, output: list[str]) -> str:
        return "\n".join(output).strip()


class StartedBefore(FactBase[bool]):
    """Whether the unit's running process started before one of ``paths`` was last written.

    A deploy that wrote a new key (or unit, or model) and then failed before its restart
    leaves a server that still runs with the old one; the next deploy finds every file
    already in place and would change nothing. The process's start time against the files'
    mtimes tells it that the server is older than what it should read.
    False when the unit does not run (starting it reads everything anyway).

    Both sides to the hundredth of a second (:func:`newer_than_process`): ``btime`` and whole
    seconds, as first written, put a server started in the same second as its unit was
    written before it, and a loaded host's idempotent run restarted it (molecule, in CI).
    """

    def command(self, unit: str, paths: list[str]) -> str:
        return (f"pid=$(systemctl show -p MainPID --value {shlex.quote(unit)} 2>/dev/null); "
                + newer_than_process(paths))

    def process(self, output: list[str]) -> bool:
        return output == ["yes"]


#: seconds a file may be newer than the process's start and still count as read by it: the
#: start is known to a clock tick (10 ms), an mtime to the kernel's coarse clock (a few ms)
STALE_TOLERANCE = 0.25


def newer_than_process(paths: list[str]) -> str:
    """Shell that prints ``yes`` when one of ``paths`` was written after process ``$pid`` started.

    The start: the wall clock at boot (now minus ``/proc/uptime``, read first, so a slow read
    errs towards "started later") plus the start in clock ticks, field 22 of ``/proc/PID/stat``
    (counted after the ``)`` closing the command name, which may hold spaces). The newest mtime:
    ``find -printf %T@`` (fractional seconds). Absent files count for nothing.
    """
    files = " ".join(shlex.quote(p) for p in paths)
    return (
        "if [ -z \"$pid\" ] || [ \"$pid\" = 0 ] || [ ! -d /proc/$pid ]; then echo no; exit 0; fi; "
        "read -r up _ < /proc/uptime; now=$(date +%s.%N); "
        "ticks=$(sed 's/^.*) //' /proc/$pid/stat | cut -d' ' -f20); "
        f"newest=$(find -L {files} -maxdepth 0 -printf '%T@\\n' 2>/dev/null | sort -n | tail -n 1); "
        "awk -v n=\"$newest\" -v now=\"$now\" -v up=\"$up\" -v t=\"$ticks\" -v hz=\"$(getconf CLK_TCK)\" "
        f"'BEGIN {{ if (n != \"\" && n + 0 > now - up + t / hz + {STALE_TOLERANCE}) print \"yes\"; else print \"no\" }}'"
    )
