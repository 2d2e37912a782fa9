"""``pip install .`` (not editable) gives a package that deploys: roles and templates inside it.

Builds the wheel, installs it with its declared dependencies into a fresh venv, and
renders the systemd unit and the compose file from the installed copy, from a
directory that is not this checkout (so nothing can come from the source tree).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: seconds for ``pip wheel`` of this package or ``pip install`` of the wheel with its dependencies
PIP_TIMEOUT = 600
#: seconds for the installed copy's render script or ``llamadeploy --help`` (an import and a print)
RUN_TIMEOUT = 120

RENDER = textwrap.dedent('''
    import llamadeploy, llamadeploy.roles.service as service, llamadeploy.roles.docker as docker
    from llamadeploy.config import HostConfig
    from llamadeploy.roles.model.source import ModelArtifact, ModelFile
    assert "site-packages" in llamadeploy.__file__, llamadeploy.__file__
    assert "site-packages" in service.__file__, service.__file__
    import llamadeploy.deploy  # the top-level @deploy imports every role
    cfg = HostConfig.model_validate({"model": {"path": "/m.gguf"}, "limits": {"cpus": 4.0, "memory": "8G"},
                                    "server": {"api_key": "sk-" + "k" * 20}})
    art = ModelArtifact((ModelFile("m.gguf", "", 1, "a" * 64),), "m")
    print(service.unit_file(cfg, art, "/opt/llama.cpp/current/bin/llama-server", ["--port", "8080"]))
    print("=====")
    print(docker.compose_file(cfg, art, "img:1", ["--port", "8080"], None))
''')


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)],
                   check=True, capture_output=True, timeout=PIP_TIMEOUT)
    return next(out.glob("llamadeploy-*.whl"))


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"llamadeploy"}, tops  # no top-level "roles" or "templates" package
    for expected in ("llamadeploy/roles/service/__init__.py", "llamadeploy/roles/docker/operations.py",
                     "llamadeploy/templates/service/llama-server.service.j2",
                     "llamadeploy/templates/docker/docker-compose.yml.j2", "llamadeploy/sandbox/host.py",
                     "llamadeploy/templates/node_exporter/llamadeploy-gpu-metrics.sh",
                     "llamadeploy/templates/node_exporter/llamadeploy-gpu-metrics.timer"):
        assert expected in names, expected
    metadata = next(n for n in names if n.endswith("METADATA"))
    requires = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Requires-Dist: tqdm" in requires  # used by the upload progress, so declared


def test_installed_wheel_renders_unit_and_compose(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], check=True, capture_output=True,
                   timeout=PIP_TIMEOUT)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([str(py), "-c", RENDER], cwd=elsewhere, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    unit, compose = proc.stdout.split("=====\n")
    assert "ExecStart=/opt/llama.cpp/current/bin/llama-server --port 8080" in unit
    assert "CPUQuota=400%" in unit and "MemoryMax=8G" in unit
    assert 'image: "img:1"' in compose and '"0.0.0.0:8080:8080"' in compose
    cli = subprocess.run([str(env_dir / "bin" / "llamadeploy"), "--help"], capture_output=True, text=True,
                         timeout=RUN_TIMEOUT)
    assert cli.returncode == 0 and "sandbox" in cli.stdout and "status" in cli.stdout, cli.stderr
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    assert not (site / "roles").exists() and not (site / "templates").exists()
