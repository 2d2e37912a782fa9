"""Docker mode end to end on a Docker-capable systemd host, air-gapped image flow.

The host first runs native mode (that build is reused for the image), then
switches to docker: engine from Debian's packages, image tarball pushed and
loaded, compose file with limits and health check, then back to native.
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from llamadeploy.sandbox.inventory import default_data, write_inventory
from tests.conftest import PYINFRA, REPO, SUBPROCESS_TIMEOUT, cli, run_deploy, run_testinfra, veth_bytes
from tests.e2e import docker_checks
from tests.e2e.docker_checks import COMPOSE, container, manifest
from tests.harness.images import IMAGE_REF, build_image_tarball

pytestmark = pytest.mark.e2e
API_KEY = "sk-docker-" + "4b2e" * 6


@pytest.fixture(scope="module")
def host(testhosts):
    return testhosts("dk3", 3, docker=True)


@pytest.fixture(scope="module")
def native_inv(host, tmp_path_factory):
    return write_inventory(tmp_path_factory.mktemp("dk") / "native.py", [host], default_data())


def docker_data(tarball: Path, cpus: float = 1.5) -> dict:
    data = copy.deepcopy(default_data())
    data.update({
        "llama_mode": "docker",
        "llama_docker": {"image": IMAGE_REF, "image_tarball": str(tarball)},
        "llama_limits": {"cpus": cpus, "memory": "2G", "memory_reserved": "1G"},
        "llama_server": {"api_key": API_KEY},
    })
    return data


@pytest.fixture(scope="module")
def tarball(host, native_inv) -> Path:
    result = run_deploy(native_inv)  # builds llama-server (shared ccache) for the image
    assert result.rc == 0, result.stderr[-3000:]
    return build_image_tarball(host.root)


@pytest.fixture(scope="module")
def docker_inv(host, tarball, tmp_path_factory):
    return write_inventory(tmp_path_factory.mktemp("dk") / "docker.py", [host], docker_data(tarball))


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
    # the key file: readable by the container's user (65534) alone
    key_file = "/etc/llama-server/docker-api-key"
    assert any(m["Source"] == key_file for m in info["Mounts"]), info["Mounts"]
    assert host.ssh(f"stat -c '%a %u %U' {key_file}").stdout.split() == ["600", "65534", "nobody"]
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


def test_docker_rollback_reinstates_the_previous_release_without_transfer(host, docker_inv, tmp_path):
    docker_checks.rollback_reinstates_without_transfer(host, docker_inv, tmp_path, host.root)


def test_docker_release_that_crashes_at_start_is_rolled_back_by_the_deploy(host, docker_inv, tmp_path):
    docker_checks.crash_at_start_rolled_back(host, docker_inv, tmp_path)


def test_docker_router_serves_chat_and_embeddings_and_takes_a_model_without_a_recreate(host, docker_inv, tarball,
                                                                                       tmp_path):
    """Router mode in a container (``llama_models``): chat and embeddings from one address through
    the official OpenAI client, the embeddings making sense, the key checked by the router; a third
    model is added by a preset reload, in the same container (its id and the router's pid
    unchanged), the two models' child processes untouched; then back to one model, a recreate."""
    from openai import OpenAI

    from llamadeploy.sandbox.assets import MODEL_SHA256, gemma_model

    gemma = {"path": str(gemma_model()), "sha256": MODEL_SHA256}
    chat = {**gemma, "alias": "chat", "ctx_size": 2048, "parallel": 1}
    embed = {**gemma, "alias": "embed", "kind": "embedding", "pooling": "mean", "ctx_size": 1024, "parallel": 1}
    chat_b = {**gemma, "alias": "chat-b", "load": "on_demand", "ctx_size": 1024, "parallel": 1}

    def routed(name: str, models: list[dict]) -> Path:
        data = docker_data(tarball)
        data.pop("llama_model")
        data["llama_models"] = models
        data["llama_limits"] = {**data["llama_limits"], "memory": "4G"}  # three models at once (preflight)
        return write_inventory(tmp_path / f"{name}.py", [host], data)

    result = run_deploy(routed("two", [chat, embed]))
    assert result.rc == 0, (result.stdout + result.stderr)[-5000:]
    info = container(host)
    assert "/etc/llama-router/models.ini" in info["Args"] and "--model" not in info["Args"]
    one_shot = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=120)
    client = OpenAI(base_url=f"http://{host.address}:8080/v1", api_key=API_KEY, max_retries=0, http_client=one_shot)
    assert {m.id for m in client.models.list()} == {"chat", "embed"}
    reply = client.chat.completions.create(model="chat", max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Name a colour."}])
    assert reply.choices[0].message.content and reply.usage and reply.usage.completion_tokens > 0
    texts = ["The cat sits on the mat.", "A cat is sitting on a mat.", "Quarterly tax filings are due in April."]
    v = [d.embedding for d in client.embeddings.create(model="embed", input=texts).data]

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / (sum(x * x for x in a) * sum(y * y for y in b)) ** 0.5

    assert cos(v[0], v[1]) > cos(v[0], v[2]), (cos(v[0], v[1]), cos(v[0], v[2]))
    assert httpx.get(f"http://{host.address}:8080/v1/models", timeout=30).status_code == 401  # the router checks the key

    def children() -> dict[str, str]:
        """Each loaded model's child process in the container (by its --alias): its host pid."""
        out = {}
        for line in host.ssh(f"ps -o pid=,args= --ppid {container(host)['State']['Pid']} || true").stdout.splitlines():
            child, _, args = line.strip().partition(" ")
            if "--alias " in args:
                out[args.split("--alias ", 1)[1].split()[0]] = child
        return out

    cid, pid, before = info["Id"], info["State"]["Pid"], children()
    assert set(before) == {"chat", "embed"}, before

    added = run_deploy(routed("three", [chat, embed, chat_b]))
    assert added.rc == 0, (added.stdout + added.stderr)[-5000:]
    names = [n for op in added.report["results"]["operations"] if op["success"] for n in op["names"]]
    assert any("Router re-reads its presets" in n for n in names), names
    assert not any("docker compose up" in n for n in names), names
    assert (container(host)["Id"], container(host)["State"]["Pid"]) == (cid, pid)  # no recreate, no restart
    assert {k: children()[k] for k in ("chat", "embed")} == before  # the two models were never reloaded
    assert {m.id for m in client.models.list()} == {"chat", "embed", "chat-b"}
    assert client.chat.completions.create(model="chat-b", max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": "Say hi"}]).choices[0].message.content
    three = routed("three-again", [chat, embed, chat_b])
    again = run_deploy(three)
    assert again.rc == 0 and again.changed == 0, json.dumps(again.report["results"], indent=1)[:4000]

    # status reads every model from the container's router: alias, kind, sha256 prefix, its state
    proc = cli("status", str(three), "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout)
    sha = MODEL_SHA256[:12]
    assert {m["alias"]: (m["kind"], m["sha256"], m["state"]) for m in row["models"]} == {
        "chat": ("chat", sha, "loaded"), "embed": ("embedding", sha, "loaded"), "chat-b": ("chat", sha, "loaded")}
    assert row["drift"] == [] and row["health"] == "ok", row

    # a rollback reinstates the two-model release: its preset, in a recreated container, with no
    # model sent again; the inventory's third model is then drift
    sent = veth_bytes(host)
    proc = cli("rollback", str(three))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert container(host)["Id"] != cid
    assert {m.id for m in client.models.list()} == {"chat", "embed"}
    assert "[chat-b]" not in host.ssh("cat /etc/llama-server/router/models.ini").stdout
    assert [(m.alias, m.dimensions) for m in manifest(host).models] == [("chat", None), ("embed", 640)]
    assert veth_bytes(host) - sent < 5_000_000  # the model (253 MB) never travelled again
    (row,) = json.loads(cli("status", str(three), "--json").stdout)
    assert row["drift"] == ["model chat-b to be added"] and row["health"] == "ok", row

    back = run_deploy(docker_inv)  # one model again: no router, the container recreated
    assert back.rc == 0, (back.stdout + back.stderr)[-5000:]
    assert "--model" in container(host)["Args"] and container(host)["Id"] != cid


def test_switch_back_to_native(host, native_inv):
    result = run_deploy(native_inv)
    assert result.rc == 0, result.stderr[-3000:]
    assert host.ssh("docker ps -q | wc -l").stdout.strip() == "0"
    assert host.ssh("test -e /opt/llama-server-compose/docker-compose.yml", check=False).returncode == 1
    assert host.ssh("systemctl is-active llama-server").stdout.strip() == "active"
    proc = run_testinfra(host.address)
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_a_port_an_operators_container_publishes_is_refused_naming_docker_proxy(host, tmp_path):
    """Docker's proxy holds the port of every container that publishes one; it is the deploy's
    only while the deploy's own docker release serves. On this host, native again, an operator's
    container publishes the port a deploy asks for: the deploy is refused before anything
    changes, naming docker-proxy. Before, any docker-proxy passed, and the new server failed to
    bind at its gate."""
    data = default_data()
    data["llama_server"] = {**data["llama_server"], "port": 8081}
    inv = write_inventory(tmp_path / "port.py", [host], data)
    unit = "md5sum /etc/systemd/system/llama-server.service /etc/llama-server/deploy.json"
    before = host.ssh(unit).stdout
    try:
        host.ssh(f"docker run -d --name theirs -p 8081:80 --entrypoint sleep {IMAGE_REF} infinity")
        refused = run_deploy(inv)
        out = refused.stdout + refused.stderr
        assert refused.rc != 0
        assert f"preflight refused host {host.address}: llama_server.port = 8081: " in out, out[-3000:]
        assert "is held by docker-proxy (pid " in out, out[-3000:]
        assert host.ssh(unit).stdout == before
        assert host.ssh("docker inspect -f '{{.State.Running}}' theirs").stdout.strip() == "true"
    finally:
        host.ssh("docker rm -f theirs", check=False)


def uninstalled(inv: Path) -> subprocess.CompletedProcess:
    """The uninstall, as an operator runs it (``-v``: its log, on stderr, says what it left and
    why; stdout is pyinfra's JSON report), asserted to succeed."""
    gone = subprocess.run([PYINFRA, "-y", "-v", "--json", str(inv), "llamadeploy.deploy.llama_server_removed"],
                          cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert gone.returncode == 0, (gone.stdout + gone.stderr)[-5000:]
    return gone


def test_uninstall_removes_the_image_a_deploy_brought_and_not_one_the_host_had(host, docker_inv, tarball, tmp_path):
    """The image is a service's only when its deploy loaded it: ``image REF`` in its ownership
    record. A second service that finds the image on the host does not record it, and its
    uninstall leaves it (the first service's deploy brought it); the first one's removes it."""
    record = "/var/lib/llamadeploy/{}.owned"
    assert f"image {IMAGE_REF}" in host.ssh(f"cat {record.format('llama-server')}").stdout.splitlines()
    data = docker_data(tarball)
    data["llama_service"] = {"name": "other-llm", "data_dir": "/var/lib/other-llm", "config_dir": "/etc/other-llm",
                             "cache_dir": "/var/cache/other-llm"}
    data["llama_docker"]["project_dir"] = "/opt/other-llm-compose"
    data["llama_server"]["port"] = 8081
    other = write_inventory(tmp_path / "other.py", [host], data)
    deployed = run_deploy(other)
    assert deployed.rc == 0, (deployed.stdout + deployed.stderr)[-5000:]
    assert not [line for line in host.ssh(f"cat {record.format('other-llm')}").stdout.splitlines()
                if line.startswith("image ")]

    step = f"Image {IMAGE_REF} removed"
    said = uninstalled(other).stderr
    assert step not in said and "stays: no deploy of this service brought it" in said, said[-5000:]
    assert host.ssh(f"docker image inspect {IMAGE_REF}", check=False).returncode == 0, "the other service took the image"
    assert host.ssh("systemctl is-active llama-server").stdout.strip() == "active"
    said = uninstalled(docker_inv).stderr  # the service whose deploy loaded it: its uninstall removes it
    assert f"{step} (unless a container uses it)" in said, said[-5000:]


def test_a_docker_deploy_then_uninstall_leaves_the_fresh_host_and_an_operators_engine(testhosts, tarball, tmp_path):
    """test_uninstall's snapshot check in docker mode, on a host of its own that had no engine.

    The deploy installs Debian's engine, loads the image and runs the compose project. The
    uninstall removes the container, the image, the project, the records, the engine packages it
    installed with what apt pulled in for them, and the engine's state (``/var/lib/docker``,
    ``/var/lib/containerd``, its key, the ``docker`` group). The host's files, users, groups and
    unit files are then what they were before the deploy, but for ``/etc/hosts``: netbase's
    postinst writes it when it is missing (a debootstrap tree has none; a Debian install does),
    and no purge removes it. A second uninstall changes nothing.

    Deployed again, the engine gets a container of the operator's. Purging the engine would take it
    down, so the uninstall leaves the engine and its packages, and says why."""
    import difflib

    from tests.conftest import SNAPSHOT

    box = testhosts("dk8", 8, docker=True)
    fresh = box.ssh(SNAPSHOT).stdout
    inv = write_inventory(tmp_path / "fresh-docker.py", [box], docker_data(tarball))

    def deploy() -> None:
        deployed = run_deploy(inv)
        assert deployed.rc == 0, (deployed.stdout + deployed.stderr)[-5000:]
        assert box.ssh(f"docker image inspect {IMAGE_REF} >/dev/null && docker ps -q").stdout.strip()

    deploy()
    uninstalled(inv)
    after = box.ssh(SNAPSHOT).stdout
    diff = [line for line in difflib.unified_diff(fresh.splitlines(), after.splitlines(), "fresh", "after",
                                                  lineterm="", n=0)][2:]
    assert [line for line in diff if not line.startswith("@@")] == ["+/etc/hosts"], "\n".join(diff)[:6000]
    assert box.ssh("command -v docker dockerd containerd", check=False).stdout == ""
    again = uninstalled(inv)
    assert json.loads(again.stdout)["results"]["totals"]["success"] == 0, again.stdout[-3000:]

    deploy()
    box.ssh(f"docker tag {IMAGE_REF} theirs:1 && docker run -d --name theirs --entrypoint sleep theirs:1 infinity")
    kept = uninstalled(inv)
    running = box.ssh("docker inspect -f '{{.State.Running}}' theirs", check=False)
    assert running.stdout.strip() == "true", (running.stdout + running.stderr)[-2000:]
    assert "the Docker engine the deploy installed stays" in kept.stderr, kept.stderr[-5000:]
    assert "container theirs" in kept.stderr and "image theirs:1" in kept.stderr, kept.stderr[-5000:]
    assert box.ssh("docker ps -aq --filter label=com.docker.compose.project.working_dir").stdout.strip() == ""
