"""Fleet rollouts on three real hosts: build once, rollout under load, canary fault, rollback.

One module, three hosts booted once (``ro1`` in the inventory's ``canary`` group), one
baseline deploy that also shows build-once (one compile, two hosts receive the release);
every later test moves the fleet with the real CLI (``llamadeploy rollout`` /
``rollback``) and checks it over a second channel (ssh, HTTP).
"""

from __future__ import annotations

import datetime
import json
import posixpath
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from llamadeploy.artifacts import file_sha256
from llamadeploy.manifest import DEFAULT_PATH, Manifest
from llamadeploy.sandbox import assets
from tests.conftest import (
    LLAMADEPLOY,
    LOCAL_TIMEOUT,
    REPO,
    SUBPROCESS_TIMEOUT,
    audit_rows,
    cli,
    merged_data,
    run_deploy,
    veth_bytes,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fleet(testhosts):
    return [testhosts("ro1", 61), testhosts("ro2", 62), testhosts("ro3", 63)]


def write_fleet(path: Path, fleet, **sections) -> Path:
    """An inventory as an operator writes it: a ``canary`` group of one, the rest in ``servers``."""
    data = merged_data(**sections)
    entries = [(h.inventory_entry()[0], {**h.inventory_entry()[1], **data}) for h in fleet]
    path.write_text(f"canary = {entries[:1]!r}\nservers = {entries[1:]!r}\n")
    return path


def manifest(host) -> Manifest:
    return Manifest.parse(host.ssh(f"cat {DEFAULT_PATH}").stdout)


def chat(host, timeout: float = 60) -> str:
    r = httpx.post(f"http://{host.address}:8080/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8}, timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def baseline(fleet, tmp_path_factory):
    """All three hosts deployed in one pyinfra run, from an empty controller cache."""
    tmp = tmp_path_factory.mktemp("ro")
    inv = write_fleet(tmp / "base.py", fleet)
    result = run_deploy(inv, env={"LLAMADEPLOY_CACHE": str(tmp / "empty-cache")})
    assert result.rc == 0, (result.stdout + result.stderr)[-4000:]
    return inv, result, tmp


def op_hosts(result, prefix: str, contains: str = "") -> list[str]:
    """Hosts on which an operation named ``prefix...`` (containing ``contains``) changed something;
    pyinfra prefixes the names of operations in a deploy with ``<deploy> | ``."""
    out = []
    for op in result.report["results"]["operations"]:
        if any(n.split(" | ")[-1].startswith(prefix) and contains in n for n in op["names"]):
            out += op["success"]
    return sorted(out)


def test_build_once_one_compile_two_receive(fleet, baseline):
    """Three hosts of one kind, empty controller cache: one compiles, the others get its tarball."""
    _, result, tmp = baseline
    compiled = op_hosts(result, "Build llama-server")
    received = op_hosts(result, "Release ", "from the controller's cache")
    assert len(compiled) == 1, compiled
    assert sorted(compiled + received) == sorted(h.address for h in fleet), (compiled, received)
    for h in fleet:  # no compiler on the hosts that received the release
        has_cmake = h.ssh("command -v cmake", check=False).returncode == 0
        assert has_cmake == (h.address in compiled), h.address
    cached = list((tmp / "empty-cache" / "releases").glob("*/*.tar.gz"))
    assert len(cached) == 1 and Path(f"{cached[0]}.sha256").is_file()
    keys = {manifest(h).release for h in fleet}
    assert len(keys) == 1
    for h in fleet:
        assert isinstance(chat(h), str)


@dataclass
class Sample:
    host: str
    start: float
    end: float
    error: str | None


def load(fleet, stop: threading.Event, samples: list[Sample]) -> list[threading.Thread]:
    """One client per host: streaming chat requests, each on a fresh connection (no keep-alive drops)."""

    def run(h):
        while not stop.is_set():
            t0 = time.monotonic()
            err = None
            try:
                with httpx.Client(timeout=30) as c, c.stream(
                        "POST", f"http://{h.address}:8080/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": "Count to five"}], "max_tokens": 16,
                              "stream": True}) as r:
                    if r.status_code != 200:
                        err = f"HTTP {r.status_code}"
                    else:
                        body = "".join(r.iter_text())
                        if "[DONE]" not in body:
                            err = "stream ended without [DONE]"
            except httpx.HTTPError as exc:
                err = type(exc).__name__
            samples.append(Sample(h.address, t0, time.monotonic(), err))
            if err:
                time.sleep(0.2)

    threads = [threading.Thread(target=run, args=(h,), daemon=True) for h in fleet]
    for t in threads:
        t.start()
    return threads


def rollout_with_timeline(inv: Path, *args: str, timeout: float = SUBPROCESS_TIMEOUT,
                          ) -> tuple[int, str, list[tuple[float, str]]]:
    """``llamadeploy rollout`` as a subprocess; its stderr lines with the time each arrived.
    ``subprocess.TimeoutExpired`` when it has not ended after ``timeout`` s (it is killed then)."""
    proc = subprocess.Popen([LLAMADEPLOY, "rollout", str(inv), *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    expired = threading.Event()

    def kill() -> None:  # the line-by-line read below has no timeout of its own: end the process
        expired.set()
        proc.kill()

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    lines: list[tuple[float, str]] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append((time.monotonic(), line.rstrip()))
        out = proc.stdout.read() if proc.stdout else ""
        rc = proc.wait(timeout=LOCAL_TIMEOUT)
    finally:
        watchdog.cancel()
    if expired.is_set():
        raise subprocess.TimeoutExpired(proc.args, timeout, output=out, stderr="\n".join(ln for _, ln in lines))
    return rc, out, lines


def batch_windows(lines: list[tuple[float, str]], end: float) -> dict[str, tuple[float, float]]:
    starts = [(t, ln.split(": ", 1)[1]) for t, ln in lines if ln.startswith("==> batch ")]
    out = {}
    for i, (t, hosts) in enumerate(starts):
        stop = starts[i + 1][0] if i + 1 < len(starts) else end
        for h in hosts.split(", "):
            out[h] = (t, stop)
    return out


def test_rollout_under_load_switches_one_host_at_a_time(fleet, baseline, tmp_path):
    """A new flag set rolls out canary first, then one host per batch, while every host serves
    streaming chat: requests fail only on the host being switched, during its own batch."""
    before = {h.address: manifest(h).release_id for h in fleet}
    inv = write_fleet(tmp_path / "threads.py", fleet, llama_server={"threads": 1})
    stop, samples = threading.Event(), []
    threads = load(fleet, stop, samples)
    time.sleep(3)
    try:
        rc, table, lines = rollout_with_timeline(inv, "--batch", "1")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    end = time.monotonic()
    assert rc == 0, table + "\n".join(ln for _, ln in lines)[-4000:]
    windows = batch_windows(lines, end)
    assert list(windows) == [h.address for h in fleet], windows  # the canary first, then inventory order
    rows = {ln.split()[0]: ln.split() for ln in table.splitlines()[1:]}
    for h in fleet:
        after = manifest(h).release_id
        assert after != before[h.address] and rows[h.address][1:4] == [before[h.address], after, "updated"]
        assert manifest(h).args[manifest(h).args.index("--threads") + 1] == "1"
    for s in samples:
        if s.error:
            # a request fails when its server stops, so the moment that counts is when it ended:
            # a stream that began just before its host's batch may be cut by that batch's restart
            lo, hi = windows[s.host]
            assert lo <= s.end <= hi, f"{s.host} failed outside its batch: {s}"
    per_host = {h.address: [s for s in samples if s.host == h.address] for h in fleet}
    for host, ss in per_host.items():
        ok = sum(1 for s in ss if not s.error)
        gap = [s for s in ss if s.error]
        print(f"{host}: {ok} ok, {len(gap)} failed (all ended within its own batch), "
              f"gap {max((s.end for s in gap), default=0) - min((s.start for s in gap), default=0):.1f}s")
        assert ok > 0


def test_canary_that_fails_its_gate_is_rolled_back_and_the_rest_untouched(fleet, baseline, tmp_path):
    """A release whose server cannot start: the canary fails its gate, is rolled back and serves;
    the other hosts are not touched; the command exits non-zero with the table."""
    before = {h.address: (manifest(h).release_id, h.ssh("systemctl show -p MainPID --value llama-server").stdout)
              for h in fleet}
    inv = write_fleet(tmp_path / "broken.py", fleet, llama_server={"threads": 1, "extra_args": ["--lora", "/nonexistent.gguf"]},
                      llama_health={"timeout": 20})
    result = cli("rollout", str(inv))
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    # failed as soon as the server exited, not at the gate's timeout (20 s here, 180 s by default)
    assert ("the server restarted (it crashed)" in result.stderr
            or "the server is not running (it exited)" in result.stderr), result.stderr[-3000:]
    rows = {ln.split()[0]: ln for ln in result.stdout.splitlines()[1:]}
    canary, rest = fleet[0], fleet[1:]
    assert " rolled back " in rows[canary.address], result.stdout
    assert manifest(canary).release_id == before[canary.address][0]
    assert isinstance(chat(canary), str)
    for h in rest:
        assert "not reached" in rows[h.address]
        assert (manifest(h).release_id, h.ssh("systemctl show -p MainPID --value llama-server").stdout) == before[h.address]
    assert "stopped after batch 1" in result.stderr
    # the audit trail: the canary's failed rollout, back on its release; the rest untouched
    trail = audit_rows(inv)
    run = trail[0]["run"]
    assert trail[0]["host"] == canary.address and trail[0]["action"].startswith("rollout"), trail[:3]
    ours = [r for r in trail if r["run"] == run]
    assert {r["host"] for r in ours} == {canary.address}, ours
    failed = [r for r in ours if r["action"] == "rollout" and r["outcome"] == "failed"]
    assert failed, json.dumps(ours)
    # the release that failed is named, beside the one the host is back on
    assert failed[0]["tried"] not in ("-", before[canary.address][0]), failed
    assert failed[0]["before"] == failed[0]["after"] == before[canary.address][0], failed
    assert ours[0]["after"] == before[canary.address][0], ours


def down_watch(fleet, stop: threading.Event, seen: list[set[str]]) -> threading.Thread:
    """Every 0.2 s, the hosts whose ``/health`` is not 200 (refused, 503 while loading, or no
    answer within 1 s), asked one after the other; each round's set is appended to ``seen``.
    A sample, not a proof of every instant: an overlap shorter than a round can be missed, and
    two hosts down at different moments of one round count as down at once. A batch of two
    restarts both hosts in the same operation, down together for seconds (shown with the
    rounding mutation: 2 at once)."""

    def run() -> None:
        with httpx.Client(timeout=1) as c:
            while not stop.is_set():
                down = set()
                for h in fleet:
                    try:
                        if c.get(f"http://{h.address}:8080/health").status_code != 200:
                            down.add(h.address)
                    except httpx.HTTPError:
                        down.add(h.address)
                seen.append(down)
                time.sleep(0.2)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_max_unavailable_rounds_down_and_counts_a_host_already_down(fleet, baseline):
    """``--max-unavailable 50%`` of three hosts is one host, never two: with ``--batch 2`` the
    rollout (back to the baseline from the earlier tests' threads=1, so every host restarts) still
    switches one host at a time, the canary, then ro2, then ro3, and a watcher asking every host's
    /health meanwhile never finds two down at once. With ro3's server stopped by hand, that one
    host is used up already: the rollout is refused before it drains or switches anything, naming
    ro3, and ro1 and ro2 keep their release and their process."""
    inv, _, _ = baseline
    ro3 = fleet[2]
    before = {h.address: manifest(h).release_id for h in fleet}
    stop, seen = threading.Event(), []
    watcher = down_watch(fleet, stop, seen)
    try:
        paced = cli("rollout", str(inv), "--batch", "2", "--max-unavailable", "50%")
    finally:
        stop.set()
        watcher.join(timeout=30)
    assert paced.returncode == 0, paced.stdout + paced.stderr[-3000:]
    log = paced.stdout + paced.stderr
    assert "==> rollout of 3 host(s) in 3 batch(es)" in log, log[-3000:]
    assert f"==> batch 3/3: {ro3.address}" in log, log[-3000:]
    assert all(manifest(h).release_id != before[h.address] for h in fleet), "the rollout switched no host"
    went_down = set().union(*seen)
    print(f"{len(seen)} rounds of /health; hosts seen down: {sorted(went_down)}; "
          f"most down at once: {max(map(len, seen), default=0)}")
    assert went_down, "no restart was seen: the watcher proves nothing"
    assert max(map(len, seen)) <= 1, [sorted(d) for d in seen if len(d) > 1]
    before = {h.address: (manifest(h).release_id, h.ssh("systemctl show -p MainPID --value llama-server").stdout)
              for h in fleet[:2]}
    ro3.ssh("systemctl stop llama-server")
    try:
        refused = cli("rollout", str(inv), "--batch", "2", "--max-unavailable", "50%")
        assert refused.returncode == 2, refused.stdout + refused.stderr[-3000:]
        assert (f"--max-unavailable 50% allows 1 of 3 host(s) unavailable, and 1 already are ({ro3.address}): "
                "nothing was switched") in refused.stderr, refused.stderr[-3000:]
        assert "==> batch" not in refused.stdout + refused.stderr
        assert {h.address: (manifest(h).release_id, h.ssh("systemctl show -p MainPID --value llama-server").stdout)
                for h in fleet[:2]} == before
    finally:
        ro3.ssh("systemctl start llama-server")
        deadline = time.monotonic() + 120
        while not healthy(ro3) and time.monotonic() < deadline:
            time.sleep(1)
    assert healthy(ro3)


def test_before_is_the_last_release_that_passed_its_gate_not_an_interrupted_runs(fleet, baseline, tmp_path):
    """A run killed between its switch and its gate leaves the manifest naming a release that never
    passed a gate, and no release record of it (records are written after the gate). Made here
    the way such a run leaves it: the canary switched to a release, whose record is then taken
    away. A rollout of a release that cannot start then reports, as the canary's "before", the
    release it served last after a gate, and that is the release the canary serves again."""
    canary = fleet[0]
    served = manifest(canary).release_id
    moved = run_deploy(write_fleet(tmp_path / "threads1.py", fleet, llama_server={"threads": 1}),
                       "--limit", canary.address)
    assert moved.rc == 0, moved.stderr[-3000:]
    interrupted = manifest(canary).release_id
    assert interrupted != served
    records = posixpath.join(posixpath.dirname(DEFAULT_PATH), "releases")
    canary.ssh(f"rm -rf -- {records}/{interrupted}")  # what a killed run leaves: no record of it
    inv = write_fleet(tmp_path / "broken.py", fleet, llama_server={"threads": 1, "extra_args": ["--lora", "/nonexistent.gguf"]},
                      llama_health={"timeout": 20})
    result = cli("rollout", str(inv))
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    row = next(ln.split() for ln in result.stdout.splitlines()[1:] if ln.split()[:1] == [canary.address])
    assert row[1] == served and row[3:5] == ["rolled", "back"], result.stdout
    assert manifest(canary).release_id == served
    assert isinstance(chat(canary), str)


def test_rollback_reinstates_the_previous_release_without_transfer(fleet, baseline, tmp_path):
    """``llamadeploy rollback --limit``: the previous release (kept on the host) serves again;
    what crossed the host's network link is SSH chatter, not a model or a build."""
    inv, _, _ = baseline
    h = fleet[1]
    # on the rollout's release (a no-op when the test before ran), the baseline one kept before it
    moved = run_deploy(write_fleet(tmp_path / "threads.py", fleet, llama_server={"threads": 1}), "--limit", h.address)
    assert moved.rc == 0, moved.stderr[-3000:]
    m = manifest(h)
    status = json.loads(cli("status", str(inv), "--json").stdout)
    row = next(r for r in status if r["host"] == h.address)
    assert row["release_id"] == m.release_id and row["previous"], row
    target = row["previous"][0]
    others = {o.address: manifest(o).release_id for o in fleet if o is not h}
    sent = veth_bytes(h)
    result = cli("rollback", str(inv), "--limit", h.address)
    moved = veth_bytes(h) - sent
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert manifest(h).release_id == target
    assert isinstance(chat(h), str)
    print(f"rollback moved {moved} bytes over {h.veth}")
    assert moved < 2 * 1024 * 1024, moved  # the model alone is 253 MB, the release tarball several MB
    assert {o.address: manifest(o).release_id for o in fleet if o is not h} == others  # --limit: the rest stay
    newest = audit_rows(inv)[0]  # the manual rollback, in the host's audit trail
    assert {k: newest[k] for k in ("host", "action", "before", "after", "outcome")} == \
        {"host": h.address, "action": "rollback", "before": m.release_id, "after": target, "outcome": "ok"}, newest


def relabelled(src: Path, dest: Path) -> Path:
    """A copy of the GGUF ``src`` whose ``general.name`` ends in another letter: the same model
    (llama-server loads and answers with it) with another sha256, written in place by gguf-py."""
    from gguf import GGUFReader

    shutil.copyfile(src, dest)
    reader = GGUFReader(dest, "r+")
    field = reader.fields["general.name"]
    field.parts[field.data[0]][-1] = ord("X")  # "Gemma 3 270m" -> "Gemma 3 270X", same length
    reader.data.flush()
    del reader
    return dest


def healthy(h) -> bool:
    try:
        return httpx.get(f"http://{h.address}:8080/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def mapped_inode(h, path: str) -> str:
    """The inode of ``path`` as the running llama-server mapped it (llama.cpp mmaps the model)."""
    pid = h.ssh("systemctl show -p MainPID --value llama-server").stdout.strip()
    maps = h.ssh(f"cat /proc/{pid}/maps").stdout.splitlines()
    inodes = {line.split()[4] for line in maps if line.split()[-1] == path}
    assert len(inodes) == 1, f"{path} mapped as {inodes} by pid {pid}"
    return inodes.pop()


def test_rollback_past_a_newer_model_of_the_same_name_transfers_nothing(fleet, baseline, tmp_path):
    """A newer model under the same file name never reaches the name the serving release reads
    before the switch: a deploy that fails after the transfer leaves it staged by content, and a
    restart of the old release by hand loads the old weights. The switch links it into place;
    the release it replaced is still reinstated with no transfer: the old content is kept (a
    hard link under ``.kept/<sha256>/``) and the rollback links it back into place."""
    inv, _, _ = baseline
    h = fleet[2]
    before = manifest(h)
    src = assets.gemma_model()
    (tmp_path / "newer").mkdir()
    newer = relabelled(src, tmp_path / "newer" / src.name)
    newer_model = {"path": str(newer), "sha256": file_sha256(str(newer))}
    staged = f"/var/lib/llama-server/models/.kept/{newer_model['sha256']}/{src.name}"

    # the new content is sent, then the release fails its flag check, before the switch
    bad = write_fleet(tmp_path / "newer-bad.py", fleet, llama_model=newer_model,
                      llama_server={"extra_args": ["--no-such-flag"]})
    result = run_deploy(bad, "--limit", h.address)
    assert result.rc != 0 and "--no-such-flag" in result.stdout + result.stderr, result.stdout[-3000:]
    assert manifest(h).release_id == before.release_id
    assert h.ssh(f"sha256sum < {staged}").stdout.split()[0] == newer_model["sha256"]  # staged by content
    # a crash or reboot of the serving release now: it loads the weights it ran
    h.ssh("systemctl restart llama-server")
    deadline = time.monotonic() + 120
    while not healthy(h):
        assert time.monotonic() < deadline, "the old release did not come back after its restart"
        time.sleep(1)
    assert h.ssh(f"sha256sum < {before.model_path}").stdout.split()[0] == before.model_sha256
    assert mapped_inode(h, before.model_path) == h.ssh(f"stat -c %i {before.model_path}").stdout.strip()
    assert isinstance(chat(h), str)

    inv_newer = write_fleet(tmp_path / "newer.py", fleet, llama_model=newer_model)
    sent = veth_bytes(h)
    started = h.ssh("date +%s.%N").stdout.strip()
    result = run_deploy(inv_newer, "--limit", h.address)
    moved = veth_bytes(h) - sent
    assert result.rc == 0, (result.stdout + result.stderr)[-4000:]
    print(f"deploying the staged newer model moved {moved} bytes over {h.veth}")
    # the old server had stopped before the new content reached its file name (the name's hash
    # record stamps the switch's rename: its ctime), so no crash of it in between could load the
    # new weights with the old release's flags, ungated
    stamp = h.ssh(f"sed -n 1p {posixpath.dirname(before.model_path)}/.{src.name}.sha256").stdout.split()
    switched_at = datetime.datetime.fromisoformat(f"{stamp[5]}T{stamp[6][:15]}{stamp[7]}").timestamp()
    journal = h.ssh(f"journalctl -u llama-server -o short-unix --no-pager --since @{started}").stdout
    stopped = [float(line.split()[0]) for line in journal.splitlines() if "Stopped " in line]
    assert stopped and min(stopped) <= switched_at, (switched_at, journal[-3000:])
    assert moved < 2 * 1024 * 1024, moved  # staged by the failed run: linked, not sent again
    after = manifest(h)
    assert after.model_sha256 != before.model_sha256 and after.model_path == before.model_path
    assert sorted(h.ssh("ls /var/lib/llama-server/models/.kept").stdout.split()) == sorted(
        [before.model_sha256, after.model_sha256])
    # the switch linked the staged content into place and the server runs it
    assert h.ssh(f"stat -c %i {staged}").stdout == h.ssh(f"stat -c %i {before.model_path}").stdout
    assert mapped_inode(h, before.model_path) == h.ssh(f"stat -c %i {staged}").stdout.strip()
    # the kept name's hash record is current (written after the replacing rename moved its ctime):
    # a rollback reads it instead of hashing the model again
    kept = f"/var/lib/llama-server/models/.kept/{before.model_sha256}"
    stamp = h.ssh(f"stat -c '%s %i %y %z' -- {kept}/{src.name}").stdout.strip()
    assert h.ssh(f"sed -n 1p {kept}/.{src.name}.sha256").stdout.strip() == stamp

    sent = veth_bytes(h)
    result = cli("rollback", str(inv), "--limit", h.address, "--to", before.release_id)
    moved = veth_bytes(h) - sent
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert manifest(h).release_id == before.release_id
    on_disk = h.ssh(f"sha256sum < {before.model_path}").stdout.split()[0]
    assert on_disk == before.model_sha256
    assert isinstance(chat(h), str)
    print(f"rollback past a replaced model moved {moved} bytes over {h.veth}")
    assert moved < 2 * 1024 * 1024, moved  # the model is 253 MB
    # the newer content stays kept: deploying it again is a link, no transfer either
    kept_now = h.ssh("ls /var/lib/llama-server/models/.kept").stdout.split()
    assert sorted(kept_now) == sorted([before.model_sha256, after.model_sha256])
    sent = veth_bytes(h)
    result = run_deploy(inv_newer, "--limit", h.address)
    moved = veth_bytes(h) - sent
    assert result.rc == 0, (result.stdout + result.stderr)[-4000:]
    assert manifest(h).release_id == after.release_id
    assert h.ssh(f"sha256sum < {before.model_path}").stdout.split()[0] == after.model_sha256
    assert isinstance(chat(h), str)
    print(f"deploying the kept newer model again moved {moved} bytes over {h.veth}")
    assert moved < 2 * 1024 * 1024, moved
