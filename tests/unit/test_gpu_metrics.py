"""The GPU metrics collector (roles/node_exporter) run on this machine against nvidia-smi's
recorded answers: the H200's, idle and busy (``h200-metrics-*.csv``), and a failing nvidia-smi.
A stand-in ``nvidia-smi`` on PATH prints the recorded bytes; the script under test is the shipped
one. That node_exporter and Prometheus take its file, and that the host dashboard's GPU panels
find its metrics, test_front shows on real hosts."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from llamadeploy import dashboards
from llamadeploy.render import template_text
from llamadeploy.roles import node_exporter
from tests.conftest import NVIDIA_SMI_DATA as DATA
from tests.conftest import gpu_metrics_file

SAMPLE = re.compile(r'^(?P<name>[a-z_]+)(?P<labels>\{[^}]*\})? (?P<value>-?[0-9.]+)$')


def collect(tmp_path: Path, stand_in: str) -> dict[str, dict[str, float]]:
    """The file the shipped script wrote with ``stand_in`` as nvidia-smi's body, parsed as
    metric -> labels -> value, every line checked against the exposition format."""
    prom = gpu_metrics_file(tmp_path, stand_in)
    assert prom.stat().st_mode & 0o777 == 0o644  # the exporter runs as prometheus
    samples: dict[str, dict[str, float]] = {}
    typed = set()
    for line in prom.read_text().splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("# HELP "):
            continue
        m = SAMPLE.match(line)
        assert m, line
        assert m["name"] in typed, line  # TYPE before the samples, as the text format requires
        samples.setdefault(m["name"], {})[m["labels"] or ""] = float(m["value"])
    return samples


def test_the_recorded_h200_busy_answer_becomes_bytes_ratios_celsius_watts(tmp_path):
    s = collect(tmp_path, f"cat {DATA / 'h200-metrics-busy.csv'}")
    labels = '{gpu="0",uuid="GPU-6ad518e7-6760-3f8f-7a9c-64c0d4c49e73",name="NVIDIA H200"}'
    assert s["llamadeploy_gpu_up"] == {"": 1}
    assert s["llamadeploy_gpu_memory_used_bytes"] == {labels: 1377 * 1024 * 1024}
    assert s["llamadeploy_gpu_memory_total_bytes"] == {labels: 143771 * 1024 * 1024}
    assert s["llamadeploy_gpu_utilization_ratio"] == {labels: 0.0}
    assert s["llamadeploy_gpu_temperature_celsius"] == {labels: 38}
    assert s["llamadeploy_gpu_power_watts"] == {labels: 126.07}
    idle = collect(tmp_path / "idle", f"cat {DATA / 'h200-metrics-idle.csv'}")
    assert idle["llamadeploy_gpu_memory_used_bytes"] == {labels: 0}


def test_a_failing_nvidia_smi_is_up_0_with_no_gpu_samples(tmp_path):
    """What a host prints after a driver update without a reboot (the error nvidia-smi gives)."""
    s = collect(tmp_path, "echo 'Failed to initialize NVML: Driver/library version mismatch'; exit 18")
    assert s == {"llamadeploy_gpu_up": {"": 0}}


def test_fields_a_gpu_does_not_support_are_left_out_not_exported_as_zero(tmp_path):
    """Two GPUs, the second without power readings (``[N/A]``, as nvidia-smi prints for boards
    without a power sensor): its other figures are kept, its power is absent, not 0. The rows are
    made up in the recorded format."""
    header = (DATA / "h200-metrics-idle.csv").read_text().splitlines()[0]
    rows = [header, "0, GPU-a, NVIDIA L4, 512, 23034, 37, 51, 27.21",
            "1, GPU-b, NVIDIA L4, 0, 23034, 0, 33, [N/A]"]
    s = collect(tmp_path, "printf '%s\\n' " + " ".join(f"'{r}'" for r in rows))
    assert s["llamadeploy_gpu_utilization_ratio"] == {'{gpu="0",uuid="GPU-a",name="NVIDIA L4"}': 0.37,
                                                        '{gpu="1",uuid="GPU-b",name="NVIDIA L4"}': 0.0}
    assert list(s["llamadeploy_gpu_power_watts"]) == ['{gpu="0",uuid="GPU-a",name="NVIDIA L4"}']


@pytest.mark.parametrize("where", ["dashboard", "rules"])
def test_what_the_dashboard_and_alerts_query_is_what_the_collector_writes(tmp_path, where):
    written = set(collect(tmp_path, f"cat {DATA / 'h200-metrics-busy.csv'}"))
    text = (" ".join(e for _, e in dashboards.queries(dashboards.dashboard("llama-host.json"))) if where == "dashboard"
            else template_text("monitor/llamadeploy-rules.yml.j2"))
    used = set(re.findall(r"llamadeploy_gpu_\w+", text))
    assert used and used <= written, used - written


def test_the_timer_runs_the_script_the_role_installs():
    service = template_text(f"node_exporter/{node_exporter.GPU_UNIT}.service")
    [script] = [dest for dest, (src, _) in node_exporter.GPU_FILES.items() if src.endswith(".sh")]
    assert f"ExecStart={script} {os.path.dirname(node_exporter.GPU_TEXTFILE)}" in service
    assert f"ReadWritePaths={os.path.dirname(node_exporter.GPU_TEXTFILE)}" in service


def test_label_values_keep_only_what_needs_no_escaping(tmp_path):
    """A quote or backslash in a GPU's name would need escaping in the exposition format, which
    mawk's gsub gets wrong; such characters become ``_`` (no real GPU name has them)."""
    header = (DATA / "h200-metrics-idle.csv").read_text().splitlines()[0]
    row = '0, GPU-a, NVIDIA "L4" \\x (test), 512, 23034, 37, 51, 27.21'
    s = collect(tmp_path, "printf '%s\\n' " + " ".join(shlex.quote(r) for r in [header, row]))
    assert list(s["llamadeploy_gpu_memory_used_bytes"]) == ['{gpu="0",uuid="GPU-a",name="NVIDIA _L4_ _x (test)"}']
