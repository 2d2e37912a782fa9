"""End to end with Hugging Face fetching: a real host, a real local Hub-compatible server.

The deploy resolves and fetches through huggingface_hub from ``HF_ENDPOINT``
(tests/harness/hfserver.py serving the real Gemma 3 270M GGUF and a split copy
of it), in both distribution modes. Checks go through ssh, HTTP and the hub
server's own request log.
"""

from __future__ import annotations

import copy
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from llamadeploy.manifest import DEFAULT_PATH, Manifest
from llamadeploy.sandbox.assets import MODEL_SHA256
from llamadeploy.sandbox.inventory import default_data, write_inventory
from tests.conftest import (
    HUB_PORT,
    HUB_TOKEN,
    LOCAL_TIMEOUT,
    PYINFRA,
    REPO,
    TINY,
    cli,
    host_state,
    run_deploy,
    run_testinfra,
)

pytestmark = pytest.mark.e2e
TINY_REPO = "llamactl-test/gemma-3-270m-GGUF"
SPLIT_REPO = "llamactl-test/gemma-3-270m-gated"


@pytest.fixture(scope="module")
def host(testhosts):
    return testhosts("lt2", 2)


@pytest.fixture(scope="module")
def controller_env(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("hf")
    token = d / "token"
    token.write_text(HUB_TOKEN + "\n")
    token.chmod(0o600)
    return {"HF_HUB_CACHE": str(d / "cache"), "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
            "TOKEN_FILE": str(token)}


def inventory(host, tmp_path: Path, name: str, model: dict, **sections) -> Path:
    data = copy.deepcopy(default_data())
    data["llama_model"] = {"hf_endpoint": f"http://{host.gateway}:{HUB_PORT}", **model}
    for key, value in sections.items():  # deep-merge a section, as pyinfra's data layers do
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return write_inventory(tmp_path / f"{name}.py", [host], data)


def hub_gets(hub, repo: str) -> int:
    return sum(1 for path, _ in hub.gets if path.startswith(repo + "/"))


def test_controller_mode_fetches_once_and_serves(host, hub, controller_env, tmp_path):
    inv = inventory(host, tmp_path, "ctl", {"repo_id": TINY_REPO, "quant": "Q4_K_M", "alias": "tiny"})
    fetched = hub_gets(hub, TINY_REPO)  # the hub serves the whole session: tests/hub ran before
    result = run_deploy(inv, env=controller_env)
    assert result.rc == 0, result.stderr[-4000:]
    assert hub_gets(hub, TINY_REPO) == fetched + 1
    manifest = Manifest.parse(host.ssh(f"cat {DEFAULT_PATH}").stdout)
    assert manifest.model_repo == TINY_REPO and manifest.model_commit == hub.repos[TINY_REPO].commit
    assert manifest.model_files == {TINY: MODEL_SHA256}
    proc = run_testinfra(host.address)
    assert proc.returncode == 0, proc.stdout[-3000:]

    # unchanged re-run: zero changes, zero bytes from the hub, zero bytes to the host
    before = host_state(host)
    again = run_deploy(inv, env=controller_env)
    assert again.rc == 0 and again.changed == 0, again.stderr[-3000:]
    assert hub_gets(hub, TINY_REPO) == fetched + 1
    assert host_state(host) == before


def test_wrong_hash_never_reaches_the_host(host, hub, controller_env, tmp_path):
    before = host_state(host)
    result = run_deploy(inventory(host, tmp_path, "bad", {"repo_id": "llamactl-test/corrupt", "filename": TINY}),
                        env=controller_env)
    assert result.rc != 0
    assert f"sha256 mismatch for llamactl-test/corrupt/{TINY}: expected {MODEL_SHA256}, got " in result.stderr
    assert host_state(host) == before
    assert httpx.get(f"http://{host.address}:8080/health", timeout=10).status_code == 200


def test_a_hostile_name_in_the_hub_listing_never_reaches_the_host(host, hub, controller_env, tmp_path):
    """A model file name the Hub's listing gives (third-party input, picked by its quant) is
    validated like an inventory name before it is used: ``gemma$(reboot)-Q8_0.gguf`` stops the
    run in both distribution modes, no file is fetched, and the host is unchanged."""
    before, fetched = host_state(host), hub_gets(hub, "llamactl-test/hostile-name")
    for mode in ("controller", "host"):
        model = {"repo_id": "llamactl-test/hostile-name", "quant": "Q8_0", "distribution": mode}
        result = run_deploy(inventory(host, tmp_path, f"hostile-{mode}", model), env=controller_env)
        assert result.rc != 0, (mode, result.stdout[-2000:])
        assert ("llamactl-test/hostile-name: the listed file 'gemma$(reboot)-Q8_0.gguf' must be a relative path of "
                "letters, digits") in result.stderr, (mode, result.stderr[-2000:])
    assert hub_gets(hub, "llamactl-test/hostile-name") == fetched
    assert host_state(host) == before
    assert httpx.get(f"http://{host.address}:8080/health", timeout=10).status_code == 200


def test_host_disk_too_small_refused(host, hub, controller_env, tmp_path):
    host.ssh("mkdir -p /srv/small && mount -t tmpfs -o size=100m tmpfs /srv/small")
    try:
        before = host_state(host)
        inv = inventory(host, tmp_path, "disk", {"repo_id": TINY_REPO, "quant": "Q4_K_M"},
                        llama_service={"data_dir": "/srv/small"})
        result = run_deploy(inv, env=controller_env)
        assert result.rc != 0
        assert f"not enough disk on host {host.address}: /srv/small/models has 100 MiB free, needs " in result.stderr
        assert host_state(host) == before
        assert host.ssh("ls -A /srv/small").stdout == ""
    finally:
        host.ssh("umount /srv/small", check=False)


def test_interrupted_transfer_completes_next_run(host, hub, controller_env, tmp_path):
    """Kill the deploy mid-upload (link throttled): the old model keeps serving; the next run completes."""
    inv = inventory(host, tmp_path, "other", {"repo_id": "llamactl-test/other-name", "filename": "gemma-other.gguf"})
    before_pid = host.ssh("systemctl show -p MainPID llama-server").stdout
    subprocess.run(["tc", "qdisc", "add", "dev", host.veth, "root", "tbf", "rate", "80mbit",
                    "burst", "64kb", "latency", "400ms"], check=True, timeout=LOCAL_TIMEOUT)
    try:
        proc = subprocess.Popen([PYINFRA, "-y", str(inv), "deploy.py"], cwd=REPO, env={**__import__("os").environ, **controller_env},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        partial = "/var/lib/llama-server/models/gemma-other.gguf.partial"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            out = host.ssh(f"stat -c %s {partial} 2>/dev/null || echo 0").stdout.strip()
            if int(out or 0) > 20_000_000:
                break
            time.sleep(0.3)
        proc.kill()
        proc.wait(timeout=LOCAL_TIMEOUT)
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", host.veth, "root"], check=False, timeout=LOCAL_TIMEOUT)
    assert int(out) > 20_000_000, "upload never started"
    assert host.ssh("test -e /var/lib/llama-server/models/gemma-other.gguf", check=False).returncode == 1
    assert host.ssh("systemctl show -p MainPID llama-server").stdout == before_pid
    assert httpx.get(f"http://{host.address}:8080/health", timeout=10).status_code == 200

    # the killed run left its deploy lock: the next run is refused until the operator releases it
    refused = run_deploy(inv, env=controller_env)
    assert refused.rc != 0 and "dead: its process is gone" in refused.stderr, refused.stderr[-3000:]
    released = cli("lock", "release", str(inv))
    assert released.returncode == 0, released.stdout + released.stderr
    result = run_deploy(inv, env=controller_env)
    assert result.rc == 0, result.stderr[-3000:]
    assert host.ssh("sha256sum /var/lib/llama-server/models/gemma-other.gguf").stdout.split()[0] == MODEL_SHA256
    assert host.ssh("ls /var/lib/llama-server/models/").stdout.count(".partial") == 0


def test_host_mode_gated_split_model_with_token(host, hub, controller_env, tmp_path):
    """Each host downloads itself (isolated huggingface_hub), with the token in a 0600 file only."""
    inv = inventory(host, tmp_path, "hostmode",
                    {"repo_id": SPLIT_REPO, "quant": "Q4_K_M", "distribution": "host",
                     "hf_token_file": controller_env["TOKEN_FILE"], "alias": "split"},
                    # host-downloaded and not in the catalog: the controller never sees the GGUF, so
                    # sizing and the chat template are the operator's to give (README, "Models")
                    llama_server={"ctx_size": 8192, "parallel": 4, "chat_template": "gemma"})
    before = hub_gets(hub, SPLIT_REPO)
    result = run_deploy(inv, "-vvv", env=controller_env)
    assert result.rc == 0, (result.stdout + result.stderr)[-4000:]
    assert HUB_TOKEN not in result.stdout + result.stderr
    assert hub_gets(hub, SPLIT_REPO) == before + 2  # both parts, fetched by the host
    args = Manifest.parse(host.ssh(f"cat {DEFAULT_PATH}").stdout).args
    assert args[args.index("--model") + 1].endswith("gemma-3-270m-q4_k_m-00001-of-00002.gguf")
    # the token was on the host only for the download (0600, root), and is gone from every tree of ours
    assert host.ssh("test -e /var/cache/llama.cpp/hf-token", check=False).returncode == 1
    assert "Hub token file (0600), for this run's download" in result.stderr + result.stdout
    assert host.ssh(f"grep -rl {HUB_TOKEN} /var/cache/llama.cpp /var/lib/llama-server /opt/llama.cpp /etc "
                    "2>/dev/null", check=False).stdout == ""
    assert HUB_TOKEN not in host.ssh("ps -eo args; journalctl --no-pager -o cat | tail -n 2000").stdout
    r = httpx.get(f"http://{host.address}:8080/v1/models", timeout=10)
    assert "split" in [m["id"] for m in r.json()["data"]]
    proc = run_testinfra(host.address)
    assert proc.returncode == 0, proc.stdout[-3000:]

    again = run_deploy(inv, env=controller_env)
    assert again.rc == 0 and again.changed == 0, again.stderr[-3000:]
    assert hub_gets(hub, SPLIT_REPO) == before + 2


def test_host_mode_download_that_fails_takes_its_token_away(host, hub, controller_env, tmp_path):
    """A host-mode download that fails (the Hub serves the file with one byte flipped: its sha256
    does not match the listing's) fails the run, and the token put there for it is gone all the
    same; the host serves what it served."""
    # a file name the host has from no other test: with the right content present under its
    # name, the deploy would download nothing
    inv = inventory(host, tmp_path, "corrupt-host",
                    {"repo_id": "llamactl-test/corrupt-elsewhere", "filename": "gemma-elsewhere.gguf", "distribution": "host",
                     "hf_token_file": controller_env["TOKEN_FILE"], "alias": "corrupt"},
                    llama_server={"ctx_size": 8192, "parallel": 4, "chat_template": "gemma"})
    serving = host.ssh("readlink /opt/llama.cpp/current", check=False).stdout
    result = run_deploy(inv, env=controller_env)
    out = result.stdout + result.stderr
    assert result.rc != 0
    assert (f"sha256 mismatch for llamactl-test/corrupt-elsewhere/gemma-elsewhere.gguf: expected {MODEL_SHA256}, got "
            in out), out[-3000:]
    assert "Hub token file (0600), for this run's download" in out  # it was there for the download
    assert host.ssh("test -e /var/cache/llama.cpp/hf-token", check=False).returncode == 1
    assert HUB_TOKEN not in out
    assert host.ssh("readlink /opt/llama.cpp/current", check=False).stdout == serving
    assert httpx.get(f"http://{host.address}:8080/health", timeout=10).status_code == 200
