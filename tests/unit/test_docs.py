"""The docs: the generated configuration reference matches the schema, every relative link in
README.md and docs/ points at a file that exists, and README stays a front page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llamadeploy import configref
from llamadeploy.config import HostConfig

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / configref.REFERENCE
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
#: [text](target) outside code; an image's ![alt](target) too
LINK_RE = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def all_fields() -> list[str]:
    """``section.field`` for every field of every section; top-level settings by their name."""
    out = []
    for name, info in HostConfig.model_fields.items():
        section = info.annotation
        if isinstance(section, type) and hasattr(section, "model_fields"):
            out += [f"{name}.{field}" for field in section.model_fields]
        else:
            out.append(name)
    return out


def test_reference_is_current():
    assert REFERENCE.is_file(), "docs/configuration-reference.md is missing: run scripts/config-reference"
    assert REFERENCE.read_text() == configref.reference_markdown(), (
        "docs/configuration-reference.md differs from llamadeploy/config.py: run scripts/config-reference"
    )


def test_reference_lists_every_field():
    text = configref.reference_markdown()
    sections = re.split(r"^## ", text, flags=re.M)
    by_heading = {part.split("\n", 1)[0].strip(): part for part in sections[1:]}
    for key in all_fields():
        if "." in key:
            section, field = key.split(".")
            table = by_heading.get(f"llama_{section}")
            assert table is not None, f"no section llama_{section} in the reference"
            assert f"| `{field}` |" in table, f"llama_{key} is not in the reference"
        else:
            assert f"| `llama_{key}` |" in by_heading["Top-level settings"], f"llama_{key} is not in the reference"


def test_every_field_has_a_description():
    described = configref.documented_fields()
    assert set(described) == set(all_fields())
    blank = [k for k, v in described.items() if not v]
    assert blank == [], f"give these a #: comment above them in llamadeploy/config.py: {blank}"


def test_type_rendering():
    import ast

    def render(source: str) -> str:
        return configref._type(ast.parse(source, mode="eval").body)

    assert render("Annotated[int, Field(ge=1, le=65535)] | None") == "int (1–65535) | None"
    assert render('Literal["git", "tarball"]') == "'git' | 'tarball'"
    assert render('Annotated[str, Field(pattern=r"^b[0-9]+$")]') == "str (pattern ^b[0-9]+$)"
    assert render("Annotated[float, Field(gt=0, le=1024)] | None") == "float (>0, ≤1024) | None"
    assert render("dict[str, CMakeValue]") == "dict[str, CMakeValue]"


def _links(path: Path) -> list[str]:
    text = path.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)  # nor do code spans
    return LINK_RE.findall(text)


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a markdown file's headings (lower case, punctuation dropped,
    spaces as hyphens, a repeated one numbered)."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    broken = []
    for target in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # a URL (https:, mailto:)
        file, _, anchor = target.partition("#")
        dest = path.parent / file if file else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert broken == [], f"{path.relative_to(ROOT)} links to files or headings that do not exist: {broken}"


def test_readme_is_a_front_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 260, "README.md is the front page (at most 260 lines): move detail into docs/"
    # CI (.ci/run) calls ./scripts/test, and the quick start is the README's promise
    assert "\n./scripts/test\n" in text
    assert "\n./scripts/quickstart\n" in text


def test_readme_links_every_page():
    linked = {Path(t.split("#", 1)[0]).name for t in _links(README) if t.startswith("docs/")}
    missing = [p.name for p in PAGES if p.name not in linked]
    assert missing == [], f"README.md does not link these docs pages: {missing}"


#: docs/platforms.md's version rows (the first cell's start) -> the packages whose versions they name
PLATFORM_ROWS = {
    "GCC": ("gcc",), "systemd": ("systemd",), "HAProxy": ("haproxy",), "Prometheus (monitor)": ("prometheus",),
    "Docker engine": ("docker.io", "docker-cli"), "Compose": ("docker-compose",), "nftables": ("nftables",),
    "aria2, busybox": ("aria2", "busybox"), "Python": ("python3",), "NVIDIA driver": ("nvidia-driver",),
    "CUDA toolkit": ("nvidia-cuda-toolkit",),
    "Prometheus Alertmanager, node exporter": ("prometheus-alertmanager", "prometheus-node-exporter"),
}


def test_the_platform_versions_in_the_docs_are_the_recorded_ones():
    """Every version docs/platforms.md names for a release is, to the digits it gives, what
    benchmarks/platforms.py recorded there (the raw JSON PLATFORMS.md names): a number in the docs
    traces to a file a script wrote."""
    import json

    page = (ROOT / "benchmarks" / "PLATFORMS.md").read_text()
    raw = json.loads((ROOT / "benchmarks" / re.search(r"Raw: `([^`]+)`", page).group(1)).read_text())
    recorded = {rel: {p: re.sub(r"^\d+:", "", v or "") for p, v in r["versions"].items()}
                for rel, r in raw["releases"].items()}
    rows = [line.split(" | ") for line in (ROOT / "docs" / "platforms.md").read_text().splitlines()
            if line.startswith("| ")]
    checked = 0
    for start, packages in PLATFORM_ROWS.items():
        row = next(r for r in rows if r[0][2:].startswith(start))
        for rel, cell in (("bookworm", row[1]), ("trixie", row[2])):
            for number in re.findall(r"(?<![\w.`])(\d+(?:\.\d+)*)(?![\w.])", cell):
                assert any(re.match(rf"{re.escape(number)}(?!\d)", recorded[rel][p]) for p in packages), \
                    (start, rel, number, {p: recorded[rel][p] for p in packages})
                checked += 1
    assert checked >= 24, checked


#: the units of a measured figure: time, size, rate, share, ratio
UNITS = r"(?:x|×|ms|min|s|MiB|GiB|MB|GB/s|GB|Mbit/s|%|tok/s|texts/s)"
#: a measured figure in prose: a number with its unit (a sign, as in +29.3 %, is not part of it)
FIGURE_RE = re.compile(rf"(?<![\w.\-/:])(\d+(?:\.\d+)?) ?({UNITS})(?![\w/])")
#: "24.2 / 45.8 / 67.1 s": every number of a slash list takes the unit after the last one
SLASH_RE = re.compile(rf"(\d+(?:\.\d+)?)((?: ?/ ?\d+(?:\.\d+)?)+) ?({UNITS})(?![\w/])")
#: a benchmark page a block of prose cites (a link or its path)
CITED_RE = re.compile(r"benchmarks/([A-Za-z0-9-]+\.md)")
CODE_RE = re.compile(r"```.*?```|`[^`\n]*`", re.S)
#: a line that starts a block of its own: a list item or a table row
ITEM_RE = re.compile(r"^\s*(?:[-*] |\d+\. |\|)")


def figures(text: str) -> list[tuple[str, str]]:
    """The (number, unit) pairs of a text (pure), a slash list's numbers each with its unit."""
    def spread(m: re.Match[str]) -> str:
        numbers = [m.group(1), *re.findall(r"\d+(?:\.\d+)?", m.group(2))]
        return " / ".join(f"{n} {m.group(3)}" for n in numbers)

    return [(n, u.replace("×", "x")) for n, u in FIGURE_RE.findall(SLASH_RE.sub(spread, text))]


def page_figures(page: str) -> set[tuple[str, str]]:
    """What a benchmark page states: its figures with their units, and every number in its
    tables' rows with any unit (a column's header names the unit there). The line naming the
    commit and date is left out: a time of day is no figure."""
    lines = [line for line in page.splitlines() if not line.startswith(("Written whole by", "Generated by"))]
    out = set(figures("\n".join(lines)))
    for line in lines:
        if line.startswith("|"):
            out |= {(n, "*") for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", line)}
    return out


def figure_blocks(path: Path) -> list[tuple[int, str]]:
    """The blocks of prose of a page (paragraphs, list items, table rows), each with its first
    line, code taken out."""
    text = CODE_RE.sub(lambda m: "\n" * m.group(0).count("\n"), path.read_text())
    blocks: list[tuple[int, str]] = []
    start, lines = 1, []
    for n, line in enumerate(text.splitlines() + [""], 1):
        if lines and (not line.strip() or ITEM_RE.match(line)):
            blocks.append((start, "\n".join(lines)))
            lines = []
        if line.strip():
            if not lines:
                start = n
            lines.append(line)
    return blocks


def cited_figures(path: Path) -> list[tuple[int, list[str], list[tuple[str, str]]]]:
    """(line, the benchmark pages it cites, its figures) of every block of ``path`` that cites a
    page and quotes a figure. A list item that cites none is read against the pages the paragraph
    before its list cites ("ROUTER.md holds one run: - chat ... - embeddings ..."); a heading or
    another paragraph ends that."""
    out = []
    intro: list[str] = []
    for line, block in figure_blocks(path):
        own = sorted(set(CITED_RE.findall(block)))
        item = bool(ITEM_RE.match(block))
        if not item:
            intro = own
        pages = own or (intro if item else [])
        found = figures(block)
        if pages and found:
            out.append((line, pages, found))
    return out


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: p.name)
def test_every_figure_beside_a_benchmark_page_is_on_that_page(path: Path):
    """A figure the docs quote next to a benchmark page (a paragraph or list that links it) is one
    that page states, number and unit, as its script wrote it: when a re-run rewrites the page,
    prose that still quotes the old run fails here until it is brought up to date (issue 22: every
    number in the docs traces to a file a script wrote). Figures in prose that cites no page are
    not checked: settings and examples (``512 tokens``), not measurements."""
    stale = []
    for line, pages, found in cited_figures(path):
        stated: set[tuple[str, str]] = set()
        for page in pages:
            stated |= page_figures((ROOT / "benchmarks" / page).read_text())
        stale += [f"{path.name}:{line}: {n} {u} (not on {', '.join(pages)})" for n, u in found
                  if (n, u) not in stated and (n, "*") not in stated]
    assert stale == []


def test_the_figure_check_sees_the_figures_it_must():
    """The rule above reads what it must: ratios, times, sizes, rates and shares, each number of a
    slash list, and not code, counts, dates or a time of day."""
    assert figures("1.33x stock, 0.34 s vs 6.46 s, 1524 MiB, 60.6 tok/s, +29.3 %, 2.00× faster, 19.5 GB/s, "
                   "718.1 texts/s, 200 Mbit/s, 8 clients, 2026-12-04, 08:44:46, a 60-second run") == [
        ("1.33", "x"), ("0.34", "s"), ("6.46", "s"), ("1524", "MiB"), ("60.6", "tok/s"), ("29.3", "%"),
        ("2.00", "x"), ("19.5", "GB/s"), ("718.1", "texts/s"), ("200", "Mbit/s")]
    assert figures("in 24.2 / 45.8 / 67.1 s direct") == [("24.2", "s"), ("45.8", "s"), ("67.1", "s")]
    assert CODE_RE.sub("", "flat `--cache-ram 8192 s` here") == "flat  here"
    page = "Written whole by x at 2026-12-06T08:44:46, 44 s\n| 1 | 24.2 | **1.6x** |\ntook 0.95x\n"
    assert ("44", "s") not in page_figures(page) and ("24.2", "*") in page_figures(page)
    assert ("0.95", "x") in page_figures(page) and ("0.95", "s") not in page_figures(page)
