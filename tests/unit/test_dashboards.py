"""The shipped Grafana dashboards and ``llamadeploy dashboards export`` (pure; the queries are
run against a real Prometheus in test_front and test_front_models)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from llamadeploy import dashboards

#: llama-server b11434's own metric names (its --metrics), read from its source (fleet notes)
LLAMACPP = {"prompt_tokens_total", "tokens_predicted_total", "prompt_tokens_seconds", "predicted_tokens_seconds",
            "prompt_seconds_total", "tokens_predicted_seconds_total", "requests_processing", "requests_deferred",
            "n_decode_total", "n_busy_slots_per_decode", "n_tokens_max", "prompt_tokens_cached_total"}


@pytest.mark.parametrize("name", dashboards.DASHBOARDS)
def test_every_panel_queries_the_fleets_prometheus_with_metrics_llama_server_exports(name):
    board = dashboards.dashboard(name)
    assert board["panels"] and board["uid"].startswith("llama-")
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == dashboards.DATASOURCE_UID
        assert all(t["datasource"]["uid"] == dashboards.DATASOURCE_UID for t in panel["targets"])
    for title, expr in dashboards.queries(board):
        for metric in re.findall(r"llamacpp:(\w+)", expr):
            assert metric in LLAMACPP, (title, metric)  # the community dashboards' mistake
        for var in re.findall(r"\$(\w+)", expr):
            assert var in dashboards.variables(board), (title, var)


def test_the_per_host_and_per_model_views_have_their_variable():
    assert dashboards.variables(dashboards.dashboard("llama-host.json")) == ["host"]
    assert dashboards.variables(dashboards.dashboard("llama-model.json")) == ["model"]
    assert dashboards.filled('up{instance=~"$host:[0-9]+"}', {"host": "10.0.0.1"}) == 'up{instance=~"10.0.0.1:[0-9]+"}'


def test_export_writes_dashboards_and_provisioning(tmp_path):
    written = dashboards.export(tmp_path, "http://10.0.0.9:9090", "/var/lib/grafana/dashboards/llama")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "dashboards/llama-fleet.json", "dashboards/llama-host.json", "dashboards/llama-model.json",
        "provisioning/dashboards/llamadeploy.yml", "provisioning/datasources/llamadeploy.yml"]
    ds = yaml.safe_load((tmp_path / "provisioning/datasources/llamadeploy.yml").read_text())["datasources"][0]
    assert (ds["type"], ds["uid"], ds["url"]) == ("prometheus", dashboards.DATASOURCE_UID, "http://10.0.0.9:9090")
    provider = yaml.safe_load((tmp_path / "provisioning/dashboards/llamadeploy.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/llama"
    assert json.loads((tmp_path / "dashboards/llama-fleet.json").read_text()) == dashboards.dashboard("llama-fleet.json")


def test_cli_takes_the_datasource_from_the_inventorys_monitor(tmp_path):
    inv = tmp_path / "site.py"
    inv.write_text('servers = [("10.0.0.1", {"llama_server": {"allow_unauthenticated": True}})]\n'
                   'monitor = [("10.0.0.9", {"llama_role": "monitor", "llama_monitor": {"port": 9091}})]\n')
    out = tmp_path / "grafana"
    proc = subprocess.run([sys.executable, "-m", "llamadeploy.cli", "dashboards", "export", str(out), "--inventory",
                           str(inv)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ds = yaml.safe_load((out / "provisioning/datasources/llamadeploy.yml").read_text())["datasources"][0]
    assert ds["url"] == "http://10.0.0.9:9091"
    inv.write_text('servers = [("10.0.0.1", {"llama_server": {"allow_unauthenticated": True}})]\n')
    proc = subprocess.run([sys.executable, "-m", "llamadeploy.cli", "dashboards", "export", str(out), "--inventory",
                           str(inv)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "has no monitor host" in proc.stderr
