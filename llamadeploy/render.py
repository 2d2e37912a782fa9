"""Render the role templates shipped in ``llamadeploy.templates`` (the top-level ``templates/``).

Loaded with :mod:`importlib.resources`, so the same call works from a source
checkout and from an installed wheel, whatever the working directory.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import jinja2

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


def template_text(name: str) -> str:
    """Source of ``templates/<name>`` (e.g. ``service/llama-server.service.j2``)."""
    return files("llamadeploy.templates").joinpath(name).read_text(encoding="utf-8")


def render(name: str, **data: Any) -> str:
    """Render ``templates/<name>``; an undefined variable is an error, never an empty string."""
    return _ENV.from_string(template_text(name)).render(**data)
