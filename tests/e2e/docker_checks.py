"""Checks of a docker-mode host that run on both Debian releases: test_docker runs them on
bookworm (Debian's docker.io 20.10 and compose v1), test_trixie on trixie (docker.io 26 and
compose v2), whose containers, names and restarts the rollback and the gate observe."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from llamadeploy.manifest import DEFAULT_PATH, Manifest
from tests.conftest import cli, run_deploy, veth_bytes
from tests.harness.images import IMAGE_REF, build_image_tarball

COMPOSE = "/opt/llama-server-compose"


def container(host) -> dict:
    cid = host.ssh(f"cd {COMPOSE} && docker-compose ps -q").stdout.strip()
    return json.loads(host.ssh(f"docker inspect {cid}").stdout)[0]


def manifest(host) -> Manifest:
    return Manifest.parse(host.ssh(f"cat {DEFAULT_PATH}").stdout)


def the_host(inv: Path) -> tuple[str, dict[str, Any]]:
    """The one host of inventory ``inv`` (``hosts = [(name, data)]``), as written."""
    ns: dict = {}
    exec(inv.read_text(), ns)
    (name, data), = ns["hosts"]
    return name, data


def variant(inv: Path, out: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """The one-host inventory ``inv`` as written, with its host data changed by ``edit``."""
    name, data = the_host(inv)
    edit(data)
    out.write_text(f"hosts = {[(name, data)]!r}\n")
    return out


def key_header(inv: Path) -> dict[str, str]:
    """The bearer header for the inventory's key, if it sets one."""
    key = the_host(inv)[1].get("llama_server", {}).get("api_key")
    return {"Authorization": f"Bearer {key}"} if key else {}


def rollback_reinstates_without_transfer(host, inv: Path, tmp_path: Path, release_root: Path) -> None:
    """Release B: a rebuilt image under the same tag (another tarball, made from the built tree
    ``release_root``), nothing else changed, so only the image tells A and B apart.
    ``llamadeploy rollback``: the tag back on A's image, the container recreated, serving (with
    the key, if any); what crossed the host's link is SSH chatter, not an image or a model.
    Deploying B again then runs B's image again (the tag moved back)."""
    a, image_a = manifest(host), container(host)["Image"]
    rebuilt = build_image_tarball(release_root, out=tmp_path / "rebuilt.tar", rebuild="b")
    inv_b = variant(inv, tmp_path / "b.py", lambda d: d["llama_docker"].update(image_tarball=str(rebuilt)))
    result = run_deploy(inv_b)
    assert result.rc == 0, (result.stdout + result.stderr)[-4000:]
    b, image_b = manifest(host), container(host)["Image"]
    assert b.release_id != a.release_id and image_b != image_a

    sent = veth_bytes(host)
    result = cli("rollback", str(inv))
    moved = veth_bytes(host) - sent
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert manifest(host).release_id == a.release_id
    assert container(host)["Image"] == image_a
    assert host.ssh(f"docker image inspect --format '{{{{.Id}}}}' {IMAGE_REF}").stdout.strip() == image_a
    r = httpx.post(f"http://{host.address}:8080/v1/chat/completions", timeout=60, headers=key_header(inv),
                   json={"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8})
    assert r.status_code == 200, r.text
    print(f"docker rollback moved {moved} bytes over {host.veth}")
    assert moved < 2 * 1024 * 1024, moved  # the image tarball alone is far larger, the model 253 MB
    row = json.loads(cli("status", str(inv), "--json").stdout)[0]
    assert (row["release_id"], row["previous"][0]) == (a.release_id, b.release_id), row

    # B again, as a rollout would after the rollback: its tarball is on the host and was loaded
    # once, but the tag names A's image now: B must run B's image, not A's under B's name
    result = run_deploy(inv_b)
    assert result.rc == 0, (result.stdout + result.stderr)[-4000:]
    assert (manifest(host).release_id, container(host)["Image"]) == (b.release_id, image_b)
    result = run_deploy(inv)  # and A again, for the tests after this one
    assert result.rc == 0, (result.stdout + result.stderr)[-4000:]
    assert container(host)["Image"] == image_a


def crash_at_start_rolled_back(host, inv: Path, tmp_path: Path) -> None:
    """Docker mode's gate watches the container: a server that exits at start (Docker restarts it,
    ``restart: unless-stopped``) fails the gate at once; the deploy reinstates the release that
    served before (its compose file, recreated) and fails, naming it."""
    a, image_a = manifest(host), container(host)["Image"]

    def lora(data: dict[str, Any]) -> None:  # the inventory as written, plus one flag that cannot work
        data["llama_server"] = {**data.get("llama_server", {}), "extra_args": ["--lora", "/nonexistent.gguf"]}

    broken = variant(inv, tmp_path / "broken.py", lora)
    started = time.monotonic()
    result = run_deploy(broken)
    took = time.monotonic() - started
    out = result.stdout + result.stderr
    assert result.rc != 0
    assert "the server restarted (it crashed)" in out or "the server is not running (it exited)" in out, out[-3000:]
    assert f"rolled back to {a.release_id}, which serves now" in out, out[-3000:]
    print(f"docker: failed deploy, rollback included: {took:.1f}s")
    assert (manifest(host).release_id, container(host)["Image"]) == (a.release_id, image_a)
    assert "--lora" not in container(host)["Args"]
    r = httpx.get(f"http://{host.address}:8080/health", timeout=10)
    assert r.status_code == 200, r.text
