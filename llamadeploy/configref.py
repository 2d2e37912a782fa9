"""The configuration reference (``docs/configuration-reference.md``), generated from the schema.

:class:`llamadeploy.config.HostConfig` is the one place every setting is defined; this module
walks it and writes one markdown table per ``llama_<section>`` (field, type, default,
description), plus the top-level settings that are not sections (``llama_mode``,
``llama_role``, ...). Descriptions are the ``#:`` comments above each field in
``llamadeploy/config.py`` (else a ``Field(description=...)``);
types are the annotations as written there, with ``Annotated`` constraints shown inline, and
the named types (``AbsPath``, ``Size``, ...) are explained in a table of their own.

Regenerate with ``scripts/config-reference``; ``tests/unit/test_docs.py`` fails when the
file and :func:`reference_markdown` differ.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from llamadeploy import config

#: where ``scripts/config-reference`` writes the reference, relative to the checkout
REFERENCE = Path("docs/configuration-reference.md")

#: the docs page that explains a section, relative to docs/
PAGES: dict[str, str] = {
    "build": "operations.md",
    "docker": "deploying.md",
    "model": "deploying.md",
    "server": "tuning.md",
    "limits": "tuning.md",
    "service": "security.md",
    "health": "operations.md",
    "front": "front-and-monitor.md",
    "monitor": "front-and-monitor.md",
    "transfer": "fanout.md",
    "rpc": "rpc.md",
    "gpu": "gpu.md",
}

HEADER = """\
# Configuration reference

<!-- Generated from llamadeploy/config.py by scripts/config-reference: do not edit by hand. -->

Every setting a host can have, as `llamadeploy/config.py` defines it. Settings are pyinfra
host/group data under `llama_<section>` keys; see [configuration.md](configuration.md) for
how they are merged and validated. Descriptions are the comments in `llamadeploy/config.py`;
regenerate this file with `scripts/config-reference` after changing it.
"""


def _module_tree() -> tuple[ast.Module, list[str]]:
    source = inspect.getsource(config)
    return ast.parse(source), source.splitlines()


def _comment_above(lines: list[str], lineno: int) -> str:
    """The ``#:`` comment lines right above line ``lineno`` (1-based), joined into one line."""
    out: list[str] = []
    i = lineno - 2
    while i >= 0 and lines[i].strip().startswith("#:"):
        out.insert(0, lines[i].strip()[2:].strip())
        i -= 1
    return " ".join(out)


def _rst_to_md(text: str) -> str:
    """``code`` (reStructuredText) -> `code` (markdown)."""
    return re.sub(r"``(.+?)``", r"`\1`", text)


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell: no line breaks, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _constraints(call: ast.expr) -> str:
    """The constraints of an ``Annotated`` argument: ``Field(ge=1, le=65535)`` -> ``1–65535``."""
    if not (isinstance(call, ast.Call) and ast.unparse(call.func) == "Field"):
        return ast.unparse(call)
    kw: dict[str, str] = {}
    for k in call.keywords:
        if k.arg is None:
            continue
        try:
            kw[k.arg] = str(ast.literal_eval(k.value))
        except ValueError:
            kw[k.arg] = ast.unparse(k.value)
    parts: list[str] = []
    if "ge" in kw and "le" in kw:
        parts.append(f"{kw['ge']}–{kw['le']}")
    else:
        parts += [f"{sign}{kw[name]}" for name, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))
                  if name in kw]
    if "pattern" in kw:
        parts.append(f"pattern {kw['pattern']}")
    return ", ".join(parts)


def _type(node: ast.expr) -> str:
    """An annotation as a reader wants it: ``Annotated[int, Field(ge=1, le=9)] | None`` ->
    ``int (1–9) | None``; ``Literal["a", "b"]`` -> ``'a' | 'b'``; named types stay named."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return f"{_type(node.left)} | {_type(node.right)}"
    if isinstance(node, ast.Subscript):
        name = ast.unparse(node.value)
        args = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
        if name == "Literal":
            return " | ".join(repr(ast.literal_eval(a)) for a in args)
        if name == "Annotated":
            limits = ", ".join(c for c in (_constraints(a) for a in args[1:]) if c)
            return f"{_type(args[0])} ({limits})" if limits else _type(args[0])
        return f"{name}[{', '.join(_type(a) for a in args)}]"
    return ast.unparse(node)


def _fields(cls: type[BaseModel], tree: ast.Module, lines: list[str]) -> dict[str, tuple[str, str]]:
    """Field name -> (type as written, ``#:`` comment) from the class bodies in config.py
    (the class itself first, then its bases)."""
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    out: dict[str, tuple[str, str]] = {}
    for klass in cls.__mro__:
        node = classes.get(klass.__name__)
        if node is None:
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                name = stmt.target.id
                if name not in out:
                    out[name] = (_type(stmt.annotation), _comment_above(lines, stmt.lineno))
    return out


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    else:
        value = info.default
    return repr(value)


def _description(info: FieldInfo, comment: str) -> str:
    """The field's ``#:`` comment, else a description its type carries."""
    return _rst_to_md(comment or info.description or "")


def _table(rows: list[tuple[str, str, str, str]], first: str = "field") -> list[str]:
    out = [f"| {first} | type | default | description |", "|---|---|---|---|"]
    for name, type_, default, desc in rows:
        out.append(f"| `{_cell(name)}` | `{_cell(type_)}` | `{_cell(default)}` | {_cell(desc)} |")
    return out


def _doc_paragraphs(cls: type) -> list[str]:
    """A class docstring's paragraphs, each on one line."""
    doc = inspect.getdoc(cls) or ""
    return [_rst_to_md(" ".join(p.split())) for p in doc.split("\n\n") if p.strip()]


def _sections() -> tuple[list[str], list[str]]:
    """(top-level settings, sections) of HostConfig, in the schema's order."""
    top: list[str] = []
    sections: list[str] = []
    for name, info in config.HostConfig.model_fields.items():
        ann = info.annotation
        (sections if isinstance(ann, type) and issubclass(ann, BaseModel) else top).append(name)
    return top, sections


def documented_fields() -> dict[str, str]:
    """``section.field`` (or a top-level name) -> its description: what the reference lists."""
    tree, lines = _module_tree()
    top, sections = _sections()
    host = _fields(config.HostConfig, tree, lines)
    out = {name: _description(config.HostConfig.model_fields[name], host[name][1]) for name in top}
    for section in sections:
        cls = config.HostConfig.model_fields[section].annotation
        assert isinstance(cls, type) and issubclass(cls, BaseModel)
        parsed = _fields(cls, tree, lines)
        for name, info in cls.model_fields.items():
            out[f"{section}.{name}"] = _description(info, parsed.get(name, ("", ""))[1])
    return out


def _named_types(used: set[str], tree: ast.Module, lines: list[str]) -> list[tuple[str, str, str]]:
    """(name, what it is, constraint) of config.py's own ``Name = Annotated[...]`` types in ``used``."""
    out = []
    for stmt in tree.body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            continue
        name = stmt.targets[0].id
        if name not in used:
            continue
        value = getattr(config, name, None)
        if typing.get_origin(value) is not typing.Annotated:
            continue
        base, *meta = typing.get_args(value)
        what = _comment_above(lines, stmt.lineno)
        pattern = ""
        for m in meta:
            if isinstance(m, FieldInfo):
                what = what or (m.description or "")
                pattern = next((str(getattr(x, "pattern", "")) for x in m.metadata if getattr(x, "pattern", None)), "")
            elif callable(getattr(m, "func", None)) and not what:
                what = (inspect.getdoc(m.func) or "").split("\n\n")[0]
        rule = f"`{_cell(getattr(base, '__name__', str(base)))}`" + (f", pattern `{_cell(pattern)}`" if pattern else "")
        out.append((name, _rst_to_md(_cell(what)), rule))
    return out


def reference_markdown() -> str:
    """The whole reference, from :class:`llamadeploy.config.HostConfig` (pure: reads only the
    schema and the source of ``llamadeploy/config.py``)."""
    tree, lines = _module_tree()
    top, sections = _sections()
    out = [HEADER]
    host = _fields(config.HostConfig, tree, lines)
    used: set[str] = set()

    out += ["## Top-level settings", "",
            "One value each (not a dict): `llama_<name> = value` in host or group data.", ""]
    rows = []
    for name in top:
        info = config.HostConfig.model_fields[name]
        type_, comment = host[name]
        used.update(re.findall(r"[A-Za-z_]\w*", type_))
        rows.append((f"{config.PREFIX}{name}", type_, _default(info), _description(info, comment)))
    out += _table(rows, first="key") + [""]

    for section in sections:
        cls = config.HostConfig.model_fields[section].annotation
        assert isinstance(cls, type) and issubclass(cls, BaseModel)
        parsed = _fields(cls, tree, lines)
        out += [f"## {config.PREFIX}{section}", ""]
        for paragraph in _doc_paragraphs(cls):
            out += [paragraph, ""]
        if section in PAGES:
            out += [f"More: [{PAGES[section]}]({PAGES[section]}).", ""]
        rows = []
        for name, info in cls.model_fields.items():
            type_, comment = parsed.get(name, (str(info.annotation), ""))
            used.update(re.findall(r"[A-Za-z_]\w*", type_))
            rows.append((name, type_, _default(info), _description(info, comment)))
        out += _table(rows) + [""]

    named = _named_types(used, tree, lines)
    if named:
        out += ["## Named types", "", "Types the tables above name, as `llamadeploy/config.py` defines them.", "",
                "| type | what it is | base type and rule |", "|---|---|---|"]
        out += [f"| `{name}` | {what or '—'} | {rule} |" for name, what, rule in named]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m llamadeploy.configref [FILE]``: write the reference to FILE, or print it."""
    args = sys.argv[1:] if argv is None else argv
    text = reference_markdown()
    if args:
        Path(args[0]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
