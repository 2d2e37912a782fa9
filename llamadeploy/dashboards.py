"""Grafana dashboards and provisioning files for the fleet, for a Grafana the user runs elsewhere.

Grafana is not in Debian, so the deploy installs none. ``llamadeploy dashboards export DIR``
writes what a Grafana needs:

- the dashboards (``templates/dashboards/*.json``): the fleet overview, one host, one model;
- ``provisioning/datasources/llamadeploy.yml``: the monitor's Prometheus;
- ``provisioning/dashboards/llamadeploy.yml``: a provider that loads the dashboards from a
  folder.

Every panel's query uses only metric names that llama-server b11434, HAProxy's exporter and the
node exporter really export. Community dashboards have shipped panels for names llama-server
never had. ``test_front`` and ``test_front_models`` run each query against the monitor's real
Prometheus, with the variables filled in, and require data.
"""

from __future__ import annotations

import json
import re
from importlib.resources import files
from pathlib import Path

#: dashboard file names in ``templates/dashboards``
DASHBOARDS = ("llama-fleet.json", "llama-host.json", "llama-model.json")
#: the datasource every panel names (its uid in the provisioning file)
DATASOURCE_UID = "llamadeploy-prometheus"


def dashboard(name: str) -> dict:
    """A shipped dashboard, parsed."""
    return json.loads(files("llamadeploy.templates").joinpath("dashboards", name).read_text(encoding="utf-8"))


def queries(board: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target, in order (pure)."""
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]


def variables(board: dict) -> list[str]:
    """The template variables a dashboard's queries use (``$host``, ``$model``)."""
    return [v["name"] for v in board.get("templating", {}).get("list", [])]


def filled(expr: str, values: dict[str, str]) -> str:
    """``expr`` with Grafana's ``$name`` variables replaced by ``values`` (as Grafana sends it; pure)."""
    return re.sub(r"\$(\w+)", lambda m: values[m.group(1)], expr)


def datasource_yaml(url: str) -> str:
    """Grafana's datasource provisioning file for the monitor's Prometheus at ``url``."""
    return (
        "# Written by `llamadeploy dashboards export`: the fleet's Prometheus (the monitor host).\n"
        "apiVersion: 1\n"
        "datasources:\n"
        "  - name: llamadeploy Prometheus\n"
        "    type: prometheus\n"
        f"    uid: {DATASOURCE_UID}\n"
        "    access: proxy\n"
        f"    url: {json.dumps(url)}\n"
        "    editable: false\n"
    )


def provider_yaml(path: str) -> str:
    """Grafana's dashboard provider file: load the dashboards from ``path`` on the Grafana host."""
    return (
        "# Written by `llamadeploy dashboards export`: the llama.cpp fleet's dashboards.\n"
        "apiVersion: 1\n"
        "providers:\n"
        "  - name: llamadeploy\n"
        "    folder: llama.cpp fleet\n"
        "    type: file\n"
        "    disableDeletion: true\n"
        "    options:\n"
        f"      path: {json.dumps(path)}\n"
    )


def export(out: Path, prometheus_url: str, dashboards_path: str | None = None) -> list[Path]:
    """Write the dashboards and both provisioning files under ``out``; returns the files written.

    ``dashboards_path``: where the dashboards will be on the Grafana host (default: ``out/dashboards``
    as given, for a Grafana on this machine)."""
    written = []
    boards = out / "dashboards"
    boards.mkdir(parents=True, exist_ok=True)
    for name in DASHBOARDS:
        target = boards / name
        target.write_text(json.dumps(dashboard(name), indent=2) + "\n")
        written.append(target)
    for sub, text in (("datasources", datasource_yaml(prometheus_url)),
                      ("dashboards", provider_yaml(dashboards_path or str(boards.resolve())))):
        target = out / "provisioning" / sub / "llamadeploy.yml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        written.append(target)
    return written
