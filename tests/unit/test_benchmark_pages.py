"""Each benchmark page is its script's output from the raw JSON it names, byte for byte (pure: no
host, no network). A hand edit of a page, or a writer that drifts from what it wrote, fails here;
the page is re-written with ``python -m benchmarks.<module> --render benchmarks/<raw>.json``."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks import affinity, fanout, native_vs_portable, noop, platforms, router, rpc, soak, suite, tuned_vs_stock

OUT = Path(noop.__file__).resolve().parent

#: page, the raw JSON it was written from, and its writer's page function
PAGES: list[tuple[str, str, Callable[[dict, str], str]]] = [
    ("NOOP.md", "noop-2026-12-06.json", noop.page),
    ("AFFINITY.md", "affinity-2026-12-06.json", affinity.page),
    ("NATIVE-vs-PORTABLE.md", "native-vs-portable-2026-12-04.json", native_vs_portable.page),
    ("RESULTS.md", "results-2026-12-06.json", tuned_vs_stock.page),
    ("FANOUT.md", "fanout-2026-12-04.json", fanout.page),
    ("RPC.md", "rpc-2026-12-04.json", rpc.page),
    ("ROUTER.md", "router-2026-12-04.json", router.page),
    ("PLATFORMS.md", "platforms-2026-12-05.json", platforms.page),
    ("SOAK.md", "soak-2026-12-04.json", soak.page),
    ("SUITE.md", "suite-2026-12-06-90337d0.json", suite.page),
    ("SUITE-COLD.md", "suite-2026-12-06-02e43f8.json", suite.page),
]


@pytest.mark.parametrize(("name", "raw", "page"), PAGES, ids=[p[0] for p in PAGES])
def test_the_page_is_its_writer_s_render_of_its_raw_json(name: str, raw: str, page: Callable[[dict, str], str]):
    text = page(json.loads((OUT / raw).read_text()), raw)
    if name == "NOOP.md" and noop.NOTES.exists():  # the hand-written notes the writer appends
        text += noop.NOTES.read_text()
    assert text == (OUT / name).read_text()


@pytest.mark.parametrize(("name", "raw"), [p[:2] for p in PAGES], ids=[p[0] for p in PAGES])
def test_the_page_names_its_raw_json_and_its_run(name: str, raw: str):
    """The header says which file the numbers are in, and that file's commit is the page's."""
    text = (OUT / name).read_text()
    data = json.loads((OUT / raw).read_text())
    run = data.get("machine", data)
    assert f"Raw: `{raw}`." in text.split("\n\n")[1] or f"raw: [`{raw}`]({raw})." in text.split("\n\n")[1]
    assert re.search(rf"at commit {re.escape(run['commit'])}, {re.escape(run['date'])}, ", text)
