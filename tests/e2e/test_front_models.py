"""The front door and the monitor over servers with different model sets (router mode), on real
hosts: HAProxy (Debian's 2.6) reads each request's ``model`` and sends it to a server that serves
it; Prometheus (Debian's 2.42) scrapes each model without loading it.

Four hosts booted once for the module, on one LAN, deployed in one pyinfra run: ``fm1`` serves
chat, embeddings and an on-demand model, ``fm2`` chat and a second chat model, ``fmf`` is the
front, ``fmm`` the monitor. Checks go to the front over HTTP (the official OpenAI client where a
user would use it); which server answered is read from HAProxy's own exporter, per model backend,
and what Prometheus sees from its own API.
"""

from __future__ import annotations

import re

import httpx
import pytest

from llamadeploy.sandbox.assets import MODEL_SHA256, gemma_model
from tests.conftest import dashboard_gaps, failure_text, front_admin_state, merged_data, run_deploy, wait_for

pytestmark = pytest.mark.e2e

GEMMA = {"path": str(gemma_model()), "sha256": MODEL_SHA256}
CHAT = {**GEMMA, "alias": "chat", "ctx_size": 2048, "parallel": 2}
EMBED = {**GEMMA, "alias": "embed", "kind": "embedding", "pooling": "mean", "ctx_size": 2048, "parallel": 2}
CHAT2 = {**GEMMA, "alias": "chat-b", "ctx_size": 2048, "parallel": 2}
IDLE = {**GEMMA, "alias": "idle", "load": "on_demand", "ctx_size": 1024, "parallel": 1}


@pytest.fixture(scope="module")
def hosts(testhosts):
    return {"fm1": testhosts("fm1", 81, lan="models"), "fm2": testhosts("fm2", 82, lan="models"),
            "fmf": testhosts("fmf", 83, lan="models"), "fmm": testhosts("fmm", 84, lan="models")}


@pytest.fixture(scope="module")
def fleet(hosts, tmp_path_factory):
    inv = write_fleet(hosts, tmp_path_factory.mktemp("front-models") / "inv.py", [CHAT, CHAT2])
    result = run_deploy(inv)
    assert result.rc == 0, failure_text(result)
    return inv


def write_fleet(hosts, inv, fm2_models: list[dict], with_fm2: bool = True, front_extra: dict | None = None):
    """The module's inventory: fm1 and fm2 serve their model sets, fmf fronts them, fmm monitors
    (without fm2: the front over fm1 alone; ``front_extra``: more ``llama_front`` settings)."""
    def server(h, models):
        name, conn = h.inventory_entry()
        data = merged_data(llama_router={"models_max": 2})
        data.pop("llama_model")
        return (name, {**conn, **data, "llama_models": models})

    name, conn = hosts["fmf"].inventory_entry()
    front = (name, {**conn, **merged_data(), "llama_role": "front",
                    "llama_front": {"check_interval": 1, "metrics_allow_from": [f"{hosts['fmf'].gateway}/32"],
                                    **(front_extra or {})}})
    servers = [server(hosts["fm1"], [CHAT, EMBED, IDLE]), server(hosts["fm2"], fm2_models)][:2 if with_fm2 else 1]
    name, conn = hosts["fmm"].inventory_entry()
    monitor = (name, {**conn, **merged_data(), "llama_role": "monitor",
                      "llama_monitor": {"scrape_interval": "2s", "allow_from": [f"{hosts['fmm'].gateway}/32"]}})
    inv.write_text(f"servers = {servers!r}\nfront = {[front]!r}\nmonitor = {[monitor]!r}\n")
    return inv


def front(hosts) -> str:
    return f"http://{hosts['fmf'].address}:8080"


def answered(hosts, model: str) -> dict[str, int]:
    """2xx responses per server of the model's backend, from HAProxy's exporter."""
    text = httpx.get(f"http://{hosts['fmf'].address}:8405/metrics", timeout=10).text
    pattern = rf'^haproxy_server_http_responses_total\{{proxy="model_{re.escape(model)}",server="([^"]+)",code="2xx"\}} (\d+)'
    return {m.group(1): int(m.group(2)) for m in re.finditer(pattern, text, re.M)}


def test_after_the_deploy_the_startup_models_are_loaded_and_the_on_demand_one_is_not(hosts, fleet):
    """The gate asked every model, the on-demand one first: at models_max 2, asking it unloaded a
    startup model, which answering the startup models afterwards loaded again (asked in
    inventory order, ``chat`` would stay unloaded until its first request)."""
    states = {m["id"]: m["status"]["value"]
              for m in httpx.get(f"http://{hosts['fm1'].address}:8080/models", timeout=30).json()["data"]}
    assert states == {"chat": "loaded", "embed": "loaded", "idle": "unloaded"}, states


def test_the_fronts_model_list_is_the_union_of_the_fleets(hosts, fleet):
    from openai import OpenAI

    client = OpenAI(base_url=f"{front(hosts)}/v1", api_key="unused", max_retries=0, timeout=120)
    assert sorted(m.id for m in client.models.list()) == ["chat", "chat-b", "embed", "idle"]


def test_each_request_reaches_a_server_that_serves_its_model(hosts, fleet):
    from openai import OpenAI

    client = OpenAI(base_url=f"{front(hosts)}/v1", api_key="unused", max_retries=0, timeout=120)
    fm1, fm2 = hosts["fm1"].address, hosts["fm2"].address
    for _ in range(6):  # only fm1 has embed, only fm2 has chat-b: a wrong route would answer 400
        vectors = client.embeddings.create(model="embed", input=["a cat", "a kitten"]).data
        assert len(vectors) == 2 and len(vectors[0].embedding) == 640
        reply = client.chat.completions.create(model="chat-b", max_tokens=2,
                                               messages=[{"role": "user", "content": "Hi"}])
        assert reply.model == "chat-b"
    for _ in range(8):
        client.chat.completions.create(model="chat", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert set(answered(hosts, "embed")) == {fm1} and answered(hosts, "embed")[fm1] >= 6
    assert set(answered(hosts, "chat-b")) == {fm2} and answered(hosts, "chat-b")[fm2] >= 6
    chat = answered(hosts, "chat")
    assert chat.get(fm1, 0) > 0 and chat.get(fm2, 0) > 0, chat  # both serve chat: both get some


def server_state(hosts, backend: str, name: str) -> tuple[int, int]:
    """(operational, administrative) state of ``name`` in ``backend``, from the runtime API:
    operational 0 is down, 2 up; administrative bits 0x1 maintenance, 0x8 drain, and 0x2, 0x10
    the same inherited from the server it tracks."""
    out = hosts["fmf"].ssh(f"echo 'show servers state {backend}' | socat stdio /run/haproxy/admin.sock").stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 7 and parts[1] == backend and parts[3] == name:
            return int(parts[5]), int(parts[6])
    raise AssertionError(f"{name} is not in {backend}: {out}")


def test_a_server_drained_or_down_in_the_main_backend_gets_no_request_for_any_model(hosts, fleet):
    """The per-model backends ``track`` the main one's servers, so the two things that act there
    reach every model: a rollout's drain (the runtime API's ``set server llama_servers/X state
    drain``) and a failed health check. Requests for ``chat``, which both servers serve, then
    all go to fm1; ``chat-b``, which only fm2 serves, gets 503 while fm2 is down."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{front(hosts)}/v1", api_key="unused", max_retries=0, timeout=120)
    fm1, fm2, fmf = hosts["fm1"].address, hosts["fm2"].address, hosts["fmf"]
    runtime = "socat stdio /run/haproxy/admin.sock"

    def chats(n: int) -> dict[str, int]:
        before = answered(hosts, "chat")
        for _ in range(n):
            client.chat.completions.create(model="chat", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
        after = answered(hosts, "chat")
        return {s: after.get(s, 0) - before.get(s, 0) for s in (fm1, fm2)}

    try:
        fmf.ssh(f"echo 'set server llama_servers/{fm2} state drain' | {runtime}")
        assert server_state(hosts, "model_chat", fm2)[1] & 0x10, "drain not inherited by model_chat"
        assert chats(6) == {fm1: 6, fm2: 0}
        fmf.ssh(f"echo 'set server llama_servers/{fm2} state ready' | {runtime}")
        assert server_state(hosts, "model_chat", fm2)[1] == 0

        hosts["fm2"].ssh("systemctl stop llama-server")
        wait_for(lambda: server_state(hosts, "model_chat-b", fm2)[0] == 0, 30, "fm2 down in model_chat-b")
        assert server_state(hosts, "model_chat", fm2)[0] == 0
        assert chats(6) == {fm1: 6, fm2: 0}
        refused = httpx.post(f"{front(hosts)}/v1/chat/completions", timeout=30,
                             json={"model": "chat-b", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
        assert refused.status_code == 503, refused.text
    finally:
        fmf.ssh(f"echo 'set server llama_servers/{fm2} state ready' | {runtime}", check=False)
        hosts["fm2"].ssh("systemctl start llama-server", check=False)
    wait_for(lambda: server_state(hosts, "model_chat-b", fm2)[0] == 2, 60, "fm2 up again in model_chat-b")
    reply = client.chat.completions.create(model="chat-b", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert reply.model == "chat-b"


def test_affinity_keeps_each_conversation_on_one_server_of_its_model(hosts, fleet, tmp_path):
    """``balance: affinity`` within a model's servers: every request of a conversation (its
    ``X-Session-Id``) reaches the same one of the two servers that serve ``chat``, and the
    conversations spread over both. Which server answered is read from HAProxy's counters of the
    model's own backend."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{front(hosts)}/v1", api_key="unused", max_retries=0, timeout=120)
    fm1, fm2 = hosts["fm1"].address, hosts["fm2"].address
    inv = write_fleet(hosts, tmp_path / "affinity.py", [CHAT, CHAT2], front_extra={"balance": "affinity"})
    try:
        step = run_deploy(inv, "--limit", hosts["fmf"].address)
        assert step.rc == 0, failure_text(step)
        config = hosts["fmf"].ssh("cat /etc/haproxy/haproxy.cfg").stdout
        assert "backend model_chat\n" in config and "balance hdr(X-Session-Id)" in config.split("backend model_chat\n")[1]
        placed = {}
        for n in range(8):
            session = f"conversation-{n}"
            before = answered(hosts, "chat")
            for _ in range(3):
                client.chat.completions.create(model="chat", max_tokens=2, messages=[{"role": "user", "content": "Hi"}],
                                               extra_headers={"X-Session-Id": session})
            after = answered(hosts, "chat")
            grew = {s: after[s] - before.get(s, 0) for s in after if after[s] != before.get(s, 0)}
            assert list(grew.values()) == [3], (session, grew)  # all three on one server
            placed[session] = next(iter(grew))
        assert set(placed.values()) == {fm1, fm2}, placed  # and the conversations spread
    finally:  # leastconn again, for the tests that follow
        back = run_deploy(fleet, "--limit", hosts["fmf"].address)
        assert back.rc == 0, failure_text(back)


def test_an_unknown_model_gets_404_from_the_front_in_openais_format(hosts, fleet):
    reply = httpx.post(f"{front(hosts)}/v1/chat/completions", timeout=30,
                       json={"model": "nope", "messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 404
    assert reply.json()["error"]["type"] == "not_found_error"


def test_prometheus_scrapes_each_model_without_loading_an_unloaded_one(hosts, fleet):
    """Each model is a target (``/metrics?model=X&autoload=false``); the on-demand model that was
    never asked for answers 400 and stays unloaded, and no alert calls that a server down."""
    import time

    api = f"http://{hosts['fmm'].address}:9090/api/v1"
    fm1, fm2 = hosts["fm1"].address, hosts["fm2"].address

    def model_targets() -> dict[tuple[str, str], dict]:
        active = httpx.get(f"{api}/targets", timeout=10).json()["data"]["activeTargets"]
        return {(t["labels"]["instance"].rsplit(":", 1)[0], t["labels"]["model"]): t for t in active
                if t["labels"]["job"] == "llama-server-models"}

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        seen = model_targets()
        if len(seen) == 5 and all(t["lastScrape"] != "0001-01-01T00:00:00Z" for t in seen.values()) \
                and seen[(fm1, "chat")]["health"] == "up":
            break
        time.sleep(1)
    health = {k: t["health"] for k, t in seen.items()}
    assert health == {(fm1, "chat"): "up", (fm1, "embed"): "up", (fm1, "idle"): "down",
                      (fm2, "chat"): "up", (fm2, "chat-b"): "up"}, health
    assert "400" in seen[(fm1, "idle")]["lastError"], seen[(fm1, "idle")]
    # the scrapes (every 2 s) did not load it
    time.sleep(5)
    states = {m["id"]: m["status"]["value"] for m in httpx.get(f"http://{fm1}:8080/models", timeout=30).json()["data"]}
    assert states["idle"] == "unloaded" and states["chat"] == "loaded", states
    # the llama.cpp metrics arrive per model
    q = httpx.get(f"{api}/query", params={"query": 'count by (model) (llamacpp:prompt_tokens_total)'},
                  timeout=10).json()["data"]["result"]
    assert {r["metric"]["model"] for r in q} == {"chat", "embed", "chat-b"}
    # an unloaded model is down on purpose: neither down-alert is pending or firing, once every
    # host's node exporter (started in the same run as Prometheus) has answered its first scrape
    def node_targets() -> list[dict]:
        return httpx.get(f"{api}/targets", params={"scrapePool": "llama-node"}, timeout=10).json()["data"]["activeTargets"]

    def nodes_up() -> bool:
        return [t["health"] for t in node_targets()] == ["up"] * 4

    deadline = time.monotonic() + 60
    while not nodes_up() and time.monotonic() < deadline:
        time.sleep(1)
    assert nodes_up(), [(t["scrapeUrl"], t["health"], t["lastError"]) for t in node_targets()]
    time.sleep(5)  # the rules are evaluated every 2 s
    rules = {r["name"]: r for g in httpx.get(f"{api}/rules", timeout=10).json()["data"]["groups"] for r in g["rules"]}
    assert rules["LlamaTargetDown"]["state"] == "inactive" and rules["LlamaRouterDown"]["state"] == "inactive", \
        (rules["LlamaTargetDown"]["alerts"], rules["LlamaRouterDown"]["alerts"])


def test_the_per_model_dashboard_shows_data_for_each_loaded_model(hosts, fleet):
    """Every panel of the per-model dashboard has data in the real Prometheus for each model the
    variable offers that is loaded (an on-demand model that was never asked for has none, on purpose)."""
    import time

    from llamadeploy import dashboards

    api = f"http://{hosts['fmm'].address}:9090/api/v1"
    offered = httpx.get(f"{api}/query", params={"query": 'up{job="llama-server-models"}'}, timeout=10).json()
    models = sorted({r["metric"]["model"] for r in offered["data"]["result"]})
    assert models == ["chat", "chat-b", "embed", "idle"], models
    assert dashboards.variables(dashboards.dashboard("llama-model.json")) == ["model"]
    time.sleep(5)  # two scrapes after the earlier tests' requests
    for model in ("chat", "chat-b", "embed"):
        assert dashboard_gaps(api, ["llama-model.json"], {"model": model}) == [], model


def test_logs_finds_a_request_on_its_host_merged_and_followed(hosts, fleet):
    """``llamadeploy logs``: ``--grep`` finds a request made through the front in HAProxy's log, on
    the front and nowhere else; ``--limit`` keeps one host's llama-server lines; the fleet's
    lines come merged by time; ``-f`` prints each later request's line once, then stops on
    SIGINT with exit 0."""
    import queue
    import secrets
    import signal
    import subprocess
    import threading
    import time

    from tests.conftest import LLAMADEPLOY, REPO, cli

    def chat(probe: str) -> None:
        reply = httpx.post(f"{front(hosts)}/v1/chat/completions?{probe}=1", timeout=120,
                           json={"model": "chat", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
        assert reply.status_code == 200, reply.text

    probe = f"probe-{secrets.token_hex(6)}"
    chat(probe)
    deadline = time.monotonic() + 60
    while True:  # HAProxy logs a request when it ends; the journal has it a moment later
        found = cli("logs", str(fleet), "--grep", probe, timeout=300)
        assert found.returncode == 0, found.stdout + found.stderr[-3000:]
        lines = found.stdout.splitlines()
        if lines or time.monotonic() > deadline:
            break
        time.sleep(1)
    # each line starts with its host's inventory name: here, its address
    fm1, fmf = hosts["fm1"].address, hosts["fmf"].address
    assert len(lines) == 1 and lines[0].startswith(f"{fmf} ") and " haproxy: " in lines[0], found.stdout
    assert "model_chat" in lines[0], lines[0]  # the backend the front chose, by the body's model
    # --since (journalctl's time syntax): the request is in the last 10 minutes, not in the next hour
    recent = cli("logs", str(fleet), "--grep", probe, "--since=-10min", timeout=300)
    assert recent.returncode == 0 and recent.stdout.splitlines() == lines, recent.stdout + recent.stderr[-3000:]
    later = cli("logs", str(fleet), "--grep", probe, "--since=+1h", timeout=300)
    assert later.returncode == 0 and later.stdout == "", later.stdout + later.stderr[-3000:]

    one = cli("logs", str(fleet), "--limit", fm1, "-n", "20", timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert one.stdout and all(line.startswith(f"{fm1} ") and " llama-server: " in line
                              for line in one.stdout.splitlines()), one.stdout[-3000:]

    every = cli("logs", str(fleet), "-n", "30", timeout=300)
    assert every.returncode == 0, every.stderr[-3000:]
    stamps = [(line.split()[1], line.split()[0]) for line in every.stdout.splitlines()]
    assert {h for _, h in stamps} == {h.address for h in hosts.values()}, every.stdout[-3000:]
    assert [t for t, _ in stamps] == sorted(t for t, _ in stamps)

    follow = f"follow-{secrets.token_hex(6)}"
    proc = subprocess.Popen([LLAMADEPLOY, "logs", str(fleet), "-f", "-n", "0", "--grep", follow], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [got.put(line) for line in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    seen: list[str] = []
    try:
        sent = 0
        deadline = time.monotonic() + 120
        # requests until the follower (still connecting at first) has printed two of them
        while len({line.split(f"{follow}-")[1].split("=")[0] for line in seen}) < 2 and time.monotonic() < deadline:
            chat(f"{follow}-{sent}")
            sent += 1
            try:
                while True:
                    seen.append(got.get(timeout=2))
            except queue.Empty:
                pass
        time.sleep(3)  # one more round: nothing printed twice
        while not got.empty():
            seen.append(got.get())
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    numbers = [line.split(f"{follow}-")[1].split("=")[0] for line in seen]
    assert len(set(numbers)) >= 2 and len(numbers) == len(set(numbers)), seen
    assert all(line.startswith(f"{fmf} ") for line in seen), seen
    assert rc == 0, proc.stderr.read() if proc.stderr else rc


def test_a_rollout_makes_the_front_learn_a_server_before_it_drains_it(hosts, fleet, tmp_path):
    """The front is deployed over fm1 alone, so fm2 (serving) is unknown to it. A rollout of the
    whole inventory deploys the front first: fm2 is in its config, ready, before its batch, then
    drained there for its switch and enabled after its gate (each state seen on the front's
    runtime API while the rollout runs). Without that first step the drain of a server the front
    does not know is a no-op, and fm2 would reach the front only after the last batch."""
    import threading
    import time

    from tests.conftest import cli

    fm2 = hosts["fm2"].inventory_entry()[0]
    alone = run_deploy(write_fleet(hosts, tmp_path / "fm1-only.py", [CHAT, CHAT2], with_fm2=False),
                       "--limit", hosts["fmf"].inventory_entry()[0])
    assert alone.rc == 0, failure_text(alone)
    assert front_admin_state(hosts["fmf"], fm2, tolerant=True) == "absent"
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            state = front_admin_state(hosts["fmf"], fm2, tolerant=True)
            if state is not None and (not seen or seen[-1] != state):
                seen.append(state)
            time.sleep(0.3)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        proc = cli("rollout", str(fleet))  # the fleet's own inventory: no server changes, each is drained
    finally:
        stop.set()
        watcher.join(timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # unknown, then known and ready before its batch, drained for its switch, never unknown again
    assert seen[0] == "absent" and "drain" in seen and seen[-1] == "ready", seen
    drained = seen.index("drain")
    assert "ready" in seen[:drained] and "absent" not in seen[drained:], seen
    assert proc.stderr.index("==> fronts first") < proc.stderr.index("==> batch 1/"), proc.stderr[-3000:]
    assert front_admin_state(hosts["fmf"], fm2, tolerant=True) == "ready"


def test_a_model_removed_from_the_fleet_gets_404_at_the_front_the_others_serve(hosts, fleet, tmp_path):
    """fm2 drops chat-b (the only server of it) for another model: after the deploy the front
    answers 404 in OpenAI's format for it, lists the fleet's models without it, and chat still
    answers from both servers."""
    from openai import OpenAI

    result = run_deploy(write_fleet(hosts, tmp_path / "inv.py", [CHAT, {**IDLE, "alias": "idle-b"}]))
    assert result.rc == 0, (result.stdout + result.stderr)[-5000:]
    gone = httpx.post(f"{front(hosts)}/v1/chat/completions", timeout=30,
                      json={"model": "chat-b", "messages": [{"role": "user", "content": "Hi"}]})
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error", gone.text
    client = OpenAI(base_url=f"{front(hosts)}/v1", api_key="unused", max_retries=0, timeout=120)
    assert sorted(m.id for m in client.models.list()) == ["chat", "embed", "idle", "idle-b"]
    before = answered(hosts, "chat")
    for _ in range(8):
        reply = client.chat.completions.create(model="chat", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].message.content is not None
    after = answered(hosts, "chat")
    assert all(after.get(s, 0) > before.get(s, 0) for s in (hosts["fm1"].address, hosts["fm2"].address)), after


def test_a_rollback_brings_the_removed_model_back_at_the_front(hosts, fleet, tmp_path):
    """After the removal above (this test needs it: fm2's previous release is the fleet's first),
    ``llamadeploy rollback --limit fm2`` reinstates fm2's release with chat-b. The inventory still
    lacks chat-b: the rollback re-deploys the front, which routes by what the servers serve now,
    so chat-b answers through the front again and the front lists it; idle-b, which fm2 no
    longer serves, is gone from the front; the monitor scrapes fm2's chat-b again."""
    from openai import OpenAI

    from tests.conftest import cli

    inv = write_fleet(hosts, tmp_path / "inv.py", [CHAT, {**IDLE, "alias": "idle-b"}])  # the inventory as above
    fm2 = hosts["fm2"].inventory_entry()[0]
    proc = cli("rollback", str(inv), "--limit", fm2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # fm2 went back to the fleet's first release (the test above deployed its second)
    assert re.search(rf"^{re.escape(fm2)}\s+\S+\s+\S+\s+rolled back", proc.stdout, re.M), proc.stdout
    for other in ("fmf", "fmm"):  # then the front and the monitor
        name = re.escape(hosts[other].inventory_entry()[0])
        assert re.search(rf"^{name}\s+-\s+-\s+deployed", proc.stdout, re.M), proc.stdout
    assert "routing by the models the servers serve now" in proc.stderr, proc.stderr[-3000:]
    client = OpenAI(base_url=f"{front(hosts)}/v1", api_key="unused", max_retries=0, timeout=120)
    assert sorted(m.id for m in client.models.list()) == ["chat", "chat-b", "embed", "idle"]
    before = answered(hosts, "chat-b")
    reply = client.chat.completions.create(model="chat-b", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content is not None
    assert answered(hosts, "chat-b").get(hosts["fm2"].address, 0) > before.get(hosts["fm2"].address, 0)
    gone = httpx.post(f"{front(hosts)}/v1/chat/completions", timeout=30,
                      json={"model": "idle-b", "messages": [{"role": "user", "content": "Hi"}]})
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error", gone.text
    # the monitor, deployed by the rollback too, scrapes fm2 for the models its release serves
    api = f"http://{hosts['fmm'].address}:9090/api/v1"
    fm2_address = hosts["fm2"].address

    def fm2_models() -> set[str]:
        active = httpx.get(f"{api}/targets", timeout=10).json()["data"]["activeTargets"]
        return {t["labels"]["model"] for t in active if t["labels"]["job"] == "llama-server-models"
                and t["labels"]["instance"].rsplit(":", 1)[0] == fm2_address}

    wait_for(lambda: fm2_models() == {"chat", "chat-b"}, 90, "Prometheus to scrape fm2's chat and chat-b")
