"""Bench arithmetic (the load itself is exercised against a real server in tests/e2e)."""

from llamadeploy.bench import LevelResult, Report, format_report, percentile, roofline_ratio


def test_percentile_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert percentile(values, 50) == 10.0
    assert percentile(values, 95) == 19.0
    assert percentile(values, 100) == 20.0


def test_roofline():
    # 65 tok/s x 253 MB per token / 20 GB/s = 0.82
    assert round(roofline_ratio(65, 253_113_024, 20e9), 2) == 0.82


def test_format_report_shows_errors():
    r = Report("http://h:8080", "m", 128, [LevelResult(8, 24, 21, {"RemoteProtocolError": 3}, 10.0, 2688, 268.8, 0.2, 0.4)])
    text = format_report(r)
    assert "RemoteProtocolError: 3" in text and "268.8" in text


def test_soak_rss_growth_from_the_first_warm_sample():
    from llamadeploy.bench import SoakResult

    r = SoakResult("u", 8, 100.0, 10, 9, 1, {}, 90, 1.0, 0.1, 0.2,
                   rss_kib=[(0.0, 100), (5.0, 400), (10.0, 1000), (50.0, 1020), (95.0, 1050)])
    assert abs(r.rss_growth - 0.05) < 1e-9  # 1050 / 1000 - 1: the cold samples before 10 s do not count
    assert SoakResult("u", 8, 100.0, 0, 0, 0, {}, 0, 0.0, None, None).rss_growth is None
