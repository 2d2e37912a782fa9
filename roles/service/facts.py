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
    already in place and would change nothing. The process's start time (boot time plus its
    start in clock ticks, ``/proc/PID/stat``) against the files' mtimes tells it that the
    server is older than what it should read.
    False when the unit does not run (starting it reads everything anyway).
    """

    def command(self, unit: str, paths: list[str]) -> str:
        q = shlex.quote
        files = " ".join(q(p) for p in paths)
        return (
            f"pid=$(systemctl show -p MainPID --value {q(unit)} 2>/dev/null); "
            "if [ -z \"$pid\" ] || [ \"$pid\" = 0 ] || [ ! -d /proc/$pid ]; then echo no; exit 0; fi; "
            f"newest=$(stat -L -c %Y {files} 2>/dev/null | sort -n | tail -n 1); "
            "started=$(( $(awk '/^btime/ {print $2}' /proc/stat) + $(awk '{print $22}' /proc/$pid/stat) / $(getconf CLK_TCK) )); "
            "[ -n \"$newest\" ] && [ \"$newest\" -gt \"$started\" ] && echo yes || echo no"
        )

    def process(self, output: list[str]) -> bool:
        return output == ["yes"]
