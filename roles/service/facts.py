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
