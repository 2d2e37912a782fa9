"""Where a benchmark's raw JSON goes (benchmarks/machine.raw_path): a second run of the same day
from another commit never overwrites the raw file that an earlier page or doc quotes (pure)."""

from __future__ import annotations

import json

from benchmarks.machine import raw_path


def test_a_later_run_of_the_same_day_keeps_the_earlier_raw_file(tmp_path):
    run = {"commit": "b7298da", "date": "2026-12-04T05:58:03+00:00"}
    first = raw_path(tmp_path, "noop", run)
    assert first.name == "noop-2026-12-04.json"
    first.write_text(json.dumps(run))
    assert raw_path(tmp_path, "noop", run) == first  # the same commit again: its own file, rewritten
    later = raw_path(tmp_path, "noop", {"commit": "907ca81+changes", "date": "2026-12-04T11:00:00+00:00"})
    assert later.name == "noop-2026-12-04-907ca81-changes.json"
    # a page whose JSON nests the machine (tuned_vs_stock) is read the same way
    (tmp_path / "results-2026-12-04.json").write_text(json.dumps({"machine": run}))
    assert raw_path(tmp_path, "results", run).name == "results-2026-12-04.json"
