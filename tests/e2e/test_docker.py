"""Docker mode end to end on a Docker-capable systemd host, air-gapped image flow.

The host first runs native mode (that build is reused for the image), then
switches to docker: engine from Debian's packages, image tarball pushed and
loaded, compose file with limits and health check, then back to native.
"""

from __future__ import annotations

import copy
import json
import time

import httpx
import pytest

from llamadeploy.sandbox.inventory import default_data, write_inventory
from tests.conftest import run_deploy, run_testinfra
from tests.harness.images import IMAGE_REF, build_image_tarball

pytestmark = pytest.mark.e2e
API_KEY = "sk-docker-" + "4b2e" * 6
COMPOSE = "/opt/llama-server-compose"


@pytest.fixture(scope="module")
def host(testhosts):
    return testhosts("dk3", 3, docker=True)


@pytest.fixture(scope="module")
def native_inv(host, tmp_path_factory):
    return write_inventory(tmp_path_factory.mktemp("dk") / "native.py", [host], default_data())


@pytest.fixture(scope="module")
def docker_inv(host, native_inv, tmp_path_factory):
    result = run_deploy(native_inv)  # builds llama-server (shared ccache) for the image
    assert result.rc == 0, result.stderr[-3000:]
    tarball = build_image_tarball(host.root)
    data = copy.deepcopy(default_data())
    data.update({
        "llama_mode": "docker",
        "llama_docker": {"image": IMAGE_REF, "image_tarball": str(tarball)},
        "llama_limits": {"cpus": 1.5, "memory": "2G", "memory_reserved": "1G"},
        "llama_server": {"api_key": API_KEY},
    })
    return write_inventory(tmp_path_factory.mktemp("dk") / "docker.py", [host], data)


def container(host) -> dict:
    cid = host.ssh(f"cd {COMPOSE} && docker-compose ps -q").stdout.strip()
    return json.loads(host.ssh(f"docker inspect {cid}").stdout)[0]


def test_switch_native_to_docker(host, docker_inv):
    result = run_deploy(docker_inv, "-vvv")
    assert result.rc == 0, (result.stdout + result.stderr)[-4000:]
    assert API_KEY not in result.stdout + result.stderr
    # the native unit no longer holds the port
    assert host.ssh("systemctl is-active llama-server", check=False).stdout.strip() == "inactive"
    assert host.ssh("systemctl is-enabled llama-server", check=False).stdout.strip() == "disabled"
    assert host.ssh("ss -Hltn 'sport = :8080' | wc -l").stdout.strip() in ("1", "2")  # v4 (+v6) docker-proxy
    info = container(host)
    assert info["Config"]["Image"] == IMAGE_REF
    assert info["HostConfig"]["NanoCpus"] == 1_500_000_000
    assert info["HostConfig"]["Memory"] == 2 << 30
    assert info["HostConfig"]["MemoryReservation"] == 1 << 30
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    assert info["Config"]["User"] == "65534:65534"
    assert host.ssh(f"cd {COMPOSE} && docker-compose config -q").returncode == 0
    deadline = time.monotonic() + 90
    while container(host)["State"]["Health"]["Status"] != "healthy" and time.monotonic() < deadline:
        time.sleep(2)
    assert container(host)["State"]["Health"]["Status"] == "healthy"
    proc = run_testinfra(host.address)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert httpx.get(f"http://{host.address}:8080/v1/models", timeout=10).status_code == 401


def test_docker_second_run_changes_nothing(host, docker_inv):
    before = container(host)
    result = run_deploy(docker_inv)
    assert result.rc == 0, result.stderr[-3000:]
    assert result.changed == 0, json.dumps(result.report["results"], indent=1)[:3000]
    after = container(host)
    assert (after["Id"], after["State"]["StartedAt"]) == (before["Id"], before["State"]["StartedAt"])


def test_switch_back_to_native(host, native_inv):
    result = run_deploy(native_inv)
    assert result.rc == 0, result.stderr[-3000:]
    assert host.ssh("docker ps -q | wc -l").stdout.strip() == "0"
    assert host.ssh("test -e /opt/llama-server-compose/docker-compose.yml", check=False).returncode == 1
    assert host.ssh("systemctl is-active llama-server").stdout.strip() == "active"
    proc = run_testinfra(host.address)
    assert proc.returncode == 0, proc.stdout[-4000:]
