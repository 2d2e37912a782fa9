"""What the docker role reads from a host: images and the flags of the image's llama-server."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase

from llamadeploy.chat_template import parse_builtin_templates
from llamadeploy.facts import parse_help_flags


class ImageServerHelp(FactBase[frozenset[str]]):
    """The long options ``llama-server`` in a local Docker image accepts (its ``--help``)."""

    def command(self, image: str) -> str:
        return f"docker run --rm --network none {shlex.quote(image)} --help 2>&1 || true"

    def process(self, output: list[str]) -> frozenset[str]:
        return parse_help_flags(output)


class ImageServerTemplates(FactBase[frozenset[str]]):
    """The built-in chat template names ``llama-server`` in a local Docker image lists."""

    def command(self, image: str) -> str:
        return f"docker run --rm --network none {shlex.quote(image)} --help 2>&1 || true"

    def process(self, output: list[str]) -> frozenset[str]:
        return parse_builtin_templates(output)


class DockerImageId(FactBase[str | None]):
    """The local image ID of a reference, or None when the image is not on the host."""

    def command(self, ref: str) -> str:
        return f"docker image inspect --format '{{{{.Id}}}}' {shlex.quote(ref)} 2>/dev/null || true"

    def process(self, output: list[str]) -> str | None:
        value = "".join(output).strip()
        return value if value.startswith("sha256:") else None
