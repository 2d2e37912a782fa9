"""Render the role templates shipped in ``llamadeploy.templates`` (the top-level ``templates/``).

Loaded with :mod:`importlib.resources`, so the same call works from a source
checkout and from an installed wheel, whatever the working directory.

Every value a template prints passes one check: no control characters. A newline inside a
value would start a new directive in a unit, a new key in an INI file or compose file, a new
statement in ``haproxy.cfg`` or an nft ruleset; so rendering fails closed instead, naming the
template and the variable. The settings' own patterns refuse such values earlier, with the
inventory field; this is the backstop for every value that reaches a file, Hub names included.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib.resources import files
from typing import Any

import jinja2
from pyinfra.api import DeployError

#: C0 controls and DEL, tab excepted
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class RenderError(DeployError, ValueError):
    """A value that would change the structure of the rendered file. A ``DeployError``: raised while
    pyinfra prepares, it is one pyinfra error naming the template and the variable, no traceback,
    and nothing has changed on any host."""


def _checked(value: Any) -> Any:
    if isinstance(value, str) and CONTROL.search(value):
        raise RenderError(f"a rendered value holds a control character: {value[:120]!r}")
    return value


_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False,
                          finalize=_checked)


def template_text(name: str) -> str:
    """Source of ``templates/<name>`` (e.g. ``service/llama-server.service.j2``)."""
    return files("llamadeploy.templates").joinpath(name).read_text(encoding="utf-8")


def control_characters(data: Any, path: str = "", depth: int = 6) -> str | None:
    """The first place in ``data`` (nested dicts, lists, objects' ``__dict__``) whose text holds a
    control character, as ``name[0].field``; None when there is none (pure)."""
    if isinstance(data, str):
        return path if CONTROL.search(data) else None
    if depth == 0:
        return None
    if isinstance(data, Mapping):
        items: Any = data.items()
    elif isinstance(data, list | tuple | set | frozenset):
        items = enumerate(data)
    elif hasattr(data, "__dict__") and not isinstance(data, type):
        items = vars(data).items()
    else:
        return None
    for key, value in items:
        found = control_characters(value, f"{path}[{key}]" if isinstance(key, int) else
                                   (f"{path}.{key}" if path else str(key)), depth - 1)
        if found:
            return found
    return None


def render(name: str, **data: Any) -> str:
    """Render ``templates/<name>``; an undefined variable is an error, never an empty string, and a
    control character in any value is refused (:class:`RenderError`)."""
    bad = control_characters(data)
    if bad:
        raise RenderError(f"template {name}: the value of {bad} holds a control character (newline, CR, NUL...): "
                          "refused, nothing was written")
    try:
        return _ENV.from_string(template_text(name)).render(**data)
    except RenderError as exc:
        raise RenderError(f"template {name}: {exc}: refused, nothing was written") from None
