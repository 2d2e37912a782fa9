"""The front's haproxy.cfg and the monitor's Prometheus files, rendered from settings (pure)."""

from __future__ import annotations

import pytest
import yaml

from llamadeploy.config import HostConfig
from llamadeploy.render import render
from llamadeploy.roles.front import Backend, haproxy_config

BACKENDS = [Backend("be1", "10.0.0.1", 8080, 8), Backend("be2", "10.0.0.2", 8081, 4)]


def cfg(**front) -> HostConfig:
    return HostConfig.model_validate({"role": "front", "front": front})


def lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_a_reload_reads_the_servers_states_from_the_file_the_deploy_writes():
    """HAProxy loads the servers' states at a (re)start from the file roles/front writes just
    before its reload; the lines it keeps are those of the new config's servers."""
    from llamadeploy.roles.front import STATE_FILE, kept_states

    text = haproxy_config(cfg(), BACKENDS, "10.0.0.5")
    glob, defaults = text.split("\ndefaults\n")[0], text.split("\ndefaults\n")[1].split("\nfrontend ")[0]
    assert f"    server-state-file {STATE_FILE}" in glob.splitlines()
    assert "    load-server-state-from-file global" in defaults.splitlines()
    assert kept_states(BACKENDS) == ["be1 10.0.0.1 8080", "be2 10.0.0.2 8081"]


@pytest.mark.parametrize("version", ["2.6", "3.0"])
def test_a_reload_keeps_the_state_of_unchanged_servers_only(version):
    """``show servers state`` recorded on HAProxy 2.6.12 (bookworm) and 3.0.11 (trixie) after
    ``set server llama_servers/s1 state drain`` (tests/unit/data/haproxy), through the reload's
    awk with a new config whose s2 moved to port 8083: s1 keeps its line (and its drain), s2
    loses its own, so HAProxy takes s2's port from the config. A state line's port and address
    win over the config's (haproxy/haproxy#1412, #3296: seen on both versions with the whole
    file, 2026-12-05)."""
    import subprocess
    from pathlib import Path

    from llamadeploy.roles.front.operations import STATE_PICK

    recorded = (Path(__file__).parent / "data" / "haproxy" / f"show-servers-state-{version}.txt").read_text()
    kept = subprocess.run(["awk", "-v", "keep=s1 127.0.0.1 8081|s2 127.0.0.1 8083", STATE_PICK], input=recorded,
                          capture_output=True, text=True, check=True, timeout=10).stdout.splitlines()
    assert kept[:2] == recorded.splitlines()[:2]  # the version line and the header
    assert [(line.split()[3], line.split()[6]) for line in kept[2:]] == [("s1", "8")]  # admin state 8: drain
    everything = subprocess.run(["awk", "-v", "keep=s1 127.0.0.1 8081|s2 127.0.0.1 8082", STATE_PICK],
                                input=recorded, capture_output=True, text=True, check=True, timeout=10).stdout
    assert everything.splitlines() == recorded.splitlines()[:4]


def test_backends_checked_with_slots_as_maxconn_and_leastconn():
    c = lines(haproxy_config(cfg(), BACKENDS, "10.0.0.5"))
    assert "balance leastconn" in c
    assert "option httpchk GET /health" in c and "http-check expect status 200" in c
    assert "server be1 10.0.0.1:8080 maxconn 8" in c and "server be2 10.0.0.2:8081 maxconn 4" in c
    assert "default-server check inter 2s fall 2 rise 2 slowstart 10s" in c


def test_streams_and_dead_keepalive_connections():
    c = lines(haproxy_config(cfg(timeout_server=900), BACKENDS, "10.0.0.5"))
    assert "timeout server 900s" in c and "timeout client 900s" in c
    # never reuse a backend connection llama-server may have closed; retry only failed connects
    assert "http-reuse never" in c and "retry-on conn-failure" in c
    # the backend side closes after each response; a llama-server close must not reach the client
    assert "option http-server-close" in c
    assert not any(ln.startswith("retry-on") and "empty-response" in ln for ln in c)
    assert "option httplog" in c


def test_affinity_is_bounded_load_consistent_hashing_on_a_header():
    c = lines(haproxy_config(cfg(balance="affinity", hash_balance_factor=125), BACKENDS, "10.0.0.5"))
    assert "balance hdr(X-Session-Id)" in c and "hash-type consistent" in c and "hash-balance-factor 125" in c
    assert "balance leastconn" not in c


def test_affinity_holds_within_each_models_servers():
    """Router fleets: each model's backend hashes the session over the servers that have that
    model, so a conversation stays on one of them."""
    routed = [Backend("be1", "10.0.0.1", 8080, 8, ("chat", "embed")), Backend("be2", "10.0.0.2", 8080, 4, ("chat",))]
    c = lines(haproxy_config(cfg(balance="affinity", hash_balance_factor=125), routed, "10.0.0.5", by_model=True))
    for model, servers in (("chat", ["be1", "be2"]), ("embed", ["be1"])):
        start = c.index(f"backend model_{model}")
        block = c[start:next((i for i in range(start + 1, len(c)) if c[i].startswith(("backend", "frontend",
                                                                                      "listen"))), len(c))]
        assert "balance hdr(X-Session-Id)" in block and "hash-type consistent" in block, block
        assert "hash-balance-factor 125" in block and "balance leastconn" not in block, block
        assert [x.split()[1] for x in block if x.startswith("server")] == servers, block


def test_tls_terminates_at_12_or_later_with_optional_redirect():
    plain = lines(haproxy_config(cfg(), BACKENDS, "10.0.0.5"))
    assert "bind 0.0.0.0:8080" in plain and not any("ssl" in ln for ln in plain)
    tls = lines(haproxy_config(cfg(tls_pem="/x.pem", redirect_http=True), BACKENDS, "10.0.0.5"))
    assert "bind 0.0.0.0:8443 ssl crt /etc/haproxy/llamadeploy.pem alpn h2,http/1.1" in tls
    assert "ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets" in tls
    assert "http-request redirect scheme https code 301 unless { ssl_fc }" in tls


def test_exporter_and_runtime_api():
    c = lines(haproxy_config(cfg(metrics_port=9101), BACKENDS, "10.0.0.5"))
    # the exporter on the fleet address only (fenced to the monitors), not the clients' 0.0.0.0
    assert "bind 10.0.0.5:9101" in c and "http-request use-service prometheus-exporter if { path /metrics }" in c
    assert "stats socket /run/haproxy/admin.sock mode 660 level admin expose-fd listeners" in c


@pytest.mark.parametrize("key_file", [None, "/etc/prometheus/llama-api-key"])
def test_prometheus_config_scrapes_servers_with_the_key_and_the_front(key_file):
    conf = yaml.safe_load(render("monitor/prometheus.yml.j2", scrape_interval="15s", rules_file="/r.yml",
                                 key_file=key_file, servers_file="/s.json", fronts_file="/f.json", listen="10.0.0.9:9090",
                                 models_file=None, alertmanager=None, nodes_file="/n.json"))
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    assert jobs["llama-server"]["file_sd_configs"] == [{"files": ["/s.json"]}]
    assert jobs["haproxy"]["file_sd_configs"] == [{"files": ["/f.json"]}]
    assert ("authorization" in jobs["llama-server"]) == (key_file is not None)
    if key_file:
        assert jobs["llama-server"]["authorization"] == {"type": "Bearer", "credentials_file": key_file}
    assert conf["rule_files"] == ["/r.yml"]
    assert jobs["prometheus"]["static_configs"] == [{"targets": ["10.0.0.9:9090"]}]  # where it listens
    assert "alerting" not in conf  # no receiver configured: no Alertmanager to send to


def test_exporter_fence_admits_the_monitors_and_metrics_allow_from():
    from llamadeploy.roles.firewall import fence_rules
    from llamadeploy.roles.front import exporter_networks

    nets = exporter_networks(cfg(metrics_allow_from=["192.0.2.0/24"]), ["10.0.0.9", "fd00::9"])
    assert nets == ["10.0.0.9/32", "fd00::9/128", "192.0.2.0/24"]
    text, _ = fence_rules("llamadeploy_haproxy_exporter", "haproxy", 8405, nets)
    lines = [ln.strip() for ln in text.splitlines()]
    assert "elements = { 10.0.0.9/32, 192.0.2.0/24 }" in lines and "elements = { fd00::9/128 }" in lines
    assert lines[-3] == "tcp dport 8405 drop"
    assert "set allowed" not in fence_rules("t", "prometheus", 9090, [])[0]  # none: only the host itself


def test_alert_rules_cover_down_queued_deferred_slow_and_backend_down():
    rules = yaml.safe_load(render("monitor/llamadeploy-rules.yml.j2"))["groups"][0]["rules"]
    names = {r["alert"]: r for r in rules}
    assert set(names) == {"LlamaTargetDown", "LlamaRequestsDeferred", "LlamaRequestsQueuedAtFront",
                          "LlamaTokensPerSecondDropped", "LlamaFrontBackendDown", "LlamaRouterDown",
                          "LlamaHostDiskFull", "LlamaHostMemoryLow", "LlamaServiceRestarting", "LlamaGpuUnreadable",
                          "LlamaGpuMetricsStale"}
    assert 'job=~"llama-server|haproxy|llama-node"' in names["LlamaTargetDown"]["expr"]
    assert "llamacpp:requests_deferred" in names["LlamaRequestsDeferred"]["expr"]
    assert "{{ $labels.instance }}" in names["LlamaTargetDown"]["annotations"]["summary"]


def test_the_monitor_scrapes_the_exporter_where_the_front_binds_it():
    """``metrics_bind`` when set, else the front's fleet address; IPv6 in brackets."""
    from types import SimpleNamespace

    from llamadeploy.roles.front import exporter_address, host_port

    front = SimpleNamespace(name="lb1", data={"ssh_hostname": "10.0.0.5"})
    assert exporter_address(cfg(), front) == "10.0.0.5"
    assert exporter_address(cfg(metrics_bind="10.9.9.9"), front) == "10.9.9.9"
    assert host_port(exporter_address(cfg(metrics_bind="fd00::5"), front), 8405) == "[fd00::5]:8405"
    assert host_port("10.0.0.5", 8405) == "10.0.0.5:8405"
    # and the monitor's scrape targets use exactly that
    from pyinfra.api import Inventory

    from llamadeploy.roles.monitor import targets

    server = {"llama_server": {"allow_unauthenticated": True}}
    inv = Inventory((["10.0.0.1", "fd00::1",
                      ("10.0.0.5", {"llama_role": "front", "llama_front": {"metrics_bind": "fd00::5"}}),
                      ("10.0.0.6", {"llama_role": "front"}),
                      # reached over SSH at one address, bound on its fleet address (llama_transfer.address)
                      ("lb3", {"llama_role": "front", "ssh_hostname": "203.0.113.7",
                               "llama_transfer": {"address": "10.0.0.7"}})], server))
    servers, fronts, _, models = targets(inv)
    assert models == []
    assert fronts[0]["targets"] == ["[fd00::5]:8405", "10.0.0.6:8405", "10.0.0.7:8405"]
    assert servers[0]["targets"] == ["10.0.0.1:8080", "[fd00::1]:8080"]
    # the front renders its exporter's bind with the same function (front_door)
    from llamadeploy.hostdata import validate_inventory

    lb3, c3 = inv.get_host("lb3"), validate_inventory(inv)["lb3"]
    assert "bind 10.0.0.7:8405" in lines(haproxy_config(c3, BACKENDS, exporter_address(c3, lb3)))


def test_a_fleet_of_routers_is_routed_by_model():
    routed = [Backend("be1", "10.0.0.1", 8080, 8, ("chat", "embed")), Backend("be2", "10.0.0.2", 8080, 4, ("chat", "rr"))]
    c = lines(haproxy_config(cfg(), routed, "10.0.0.5", by_model=True))
    assert "option http-buffer-request" in c and "tune.bufsize 131072" in c
    assert "http-request set-var(txn.model) req.body,json_query('$.model') if { method POST }" in c
    assert [x for x in c if x.startswith("use_backend")] == [
        "use_backend model_chat if { var(txn.model) -m str chat }",
        "use_backend model_embed if { var(txn.model) -m str embed }",
        "use_backend model_rr if { var(txn.model) -m str rr }"]
    assert any(x.startswith("http-request return status 404") and x.endswith("!{ var(txn.model) -m str chat embed rr }")
               for x in c)
    union = next(x for x in c if "if { method GET } { path /v1/models }" in x)
    assert '"id":"chat"' in union and '"id":"embed"' in union and '"id":"rr"' in union
    embed = c[c.index("backend model_embed"):c.index("backend model_rr")]
    assert [x for x in embed if x.startswith("server")] == ["server be1 10.0.0.1:8080 maxconn 8 track llama_servers/be1"]
    # a fleet without routers keeps its config as it was (no reload for nothing)
    plain = [Backend(b.name, b.address, b.port, b.slots) for b in routed]
    assert haproxy_config(cfg(), routed, "10.0.0.5") == haproxy_config(cfg(), plain, "10.0.0.5")
    assert "use_backend" not in haproxy_config(cfg(), routed, "10.0.0.5")


def test_a_router_servers_models_are_scraped_one_by_one_without_loading_them(tmp_path):
    from pyinfra.api import Inventory

    from llamadeploy.roles.monitor import targets

    model = tmp_path / "a.gguf"
    model.write_bytes(b"GGUF")
    routed = {"llama_server": {"allow_unauthenticated": True},
              "llama_models": [{"path": str(model), "alias": "chat"},
                               {"path": str(model), "alias": "embed", "kind": "embedding", "load": "on_demand"}]}
    inv = Inventory((["10.0.0.1", ("10.0.0.2", routed)], {"llama_server": {"allow_unauthenticated": True}}))
    servers, _, _, models = targets(inv)
    assert servers[0]["targets"] == ["10.0.0.1:8080"]  # a router answers /metrics only for a model
    assert models == [
        {"targets": ["10.0.0.2:8080"], "labels": {"fleet": "llama", "model": alias, "__param_model": alias,
                                                  "__param_autoload": "false"}} for alias in ("chat", "embed")]
    conf = yaml.safe_load(render("monitor/prometheus.yml.j2", scrape_interval="15s", rules_file="/r.yml",
                                 key_file=None, servers_file="/s.json", fronts_file="/f.json", listen="10.0.0.9:9090",
                                 models_file="/m.json", alertmanager=None, nodes_file="/n.json"))
    job = next(j for j in conf["scrape_configs"] if j["job_name"] == "llama-server-models")
    assert job["file_sd_configs"] == [{"files": ["/m.json"]}]
    plain = yaml.safe_load(render("monitor/prometheus.yml.j2", scrape_interval="15s", rules_file="/r.yml",
                                  key_file=None, servers_file="/s.json", fronts_file="/f.json", listen="10.0.0.9:9090",
                                  models_file=None, alertmanager=None, nodes_file="/n.json"))
    assert [j["job_name"] for j in plain["scrape_configs"]] == ["llama-server", "haproxy", "llama-node", "prometheus"]
    rules = yaml.safe_load(render("monitor/llamadeploy-rules.yml.j2"))["groups"][0]["rules"]
    down = {r["alert"]: r["expr"] for r in rules}
    assert down["LlamaTargetDown"] == 'up{job=~"llama-server|haproxy|llama-node"} == 0'  # an unloaded model is no alert
    assert down["LlamaRouterDown"] == 'max by (instance) (up{job="llama-server-models"}) == 0'


def monitor_cfg(**am) -> HostConfig:
    return HostConfig.model_validate({"role": "monitor", "monitor": {"alertmanager": am}})


WEBHOOK = {"url": "https://hooks.example.com/llama?team=ops", "token_file": "/secrets/hook-token"}
EMAIL = {"to": ["ops@example.com", "oncall@example.com"], "sender": "alerts@example.com",
         "smarthost": "smtp.example.com:587", "username": "alerts", "password_file": "/secrets/smtp"}


def alertmanager_yml(**am) -> dict:
    a = monitor_cfg(**am).monitor.alertmanager
    return yaml.safe_load(render("monitor/alertmanager.yml.j2", am=a,
                                 token_file="/etc/prometheus/alertmanager-webhook-token" if a.webhook and a.webhook.token_file else None,
                                 password_file="/etc/prometheus/alertmanager-smtp-password" if a.email and a.email.password_file else None))


def test_alerts_go_to_the_webhook_and_every_mail_address_grouped_by_alert_and_host():
    conf = alertmanager_yml(webhook=WEBHOOK, email=EMAIL, group_wait="10s")
    assert conf["route"]["receiver"] == "llamadeploy"
    assert conf["route"]["group_by"] == ["alertname", "instance"]
    assert (conf["route"]["group_wait"], conf["route"]["repeat_interval"]) == ("10s", "4h")
    [receiver] = conf["receivers"]
    [hook] = receiver["webhook_configs"]
    assert hook["url"] == WEBHOOK["url"] and hook["send_resolved"] is True
    # the token is a file the config names: never the token, never the controller's path
    assert hook["http_config"]["authorization"] == {"type": "Bearer",
                                                   "credentials_file": "/etc/prometheus/alertmanager-webhook-token"}
    assert [m["to"] for m in receiver["email_configs"]] == EMAIL["to"]
    for mail in receiver["email_configs"]:
        assert (mail["from"], mail["smarthost"], mail["require_tls"]) == ("alerts@example.com", "smtp.example.com:587", True)
        assert mail["auth_username"] == "alerts"
        assert mail["auth_password_file"] == "/etc/prometheus/alertmanager-smtp-password"
        assert "auth_password" not in mail


def test_a_receiver_without_a_secret_names_no_file():
    [receiver] = alertmanager_yml(webhook={"url": "http://10.0.0.7:9000/"})["receivers"]
    assert "http_config" not in receiver["webhook_configs"][0] and "email_configs" not in receiver


def test_a_down_host_does_not_also_page_for_its_slow_tokens():
    """Inhibition: the alerts it names are the rules' own, and it holds per host (``instance``)."""
    conf = alertmanager_yml(webhook=WEBHOOK)
    rules = {r["alert"] for r in yaml.safe_load(render("monitor/llamadeploy-rules.yml.j2"))["groups"][0]["rules"]}
    sources = set()
    for rule in conf["inhibit_rules"]:
        assert rule["equal"] == ["instance"]
        [source] = rule["source_matchers"]
        sources.add(source.split(" = ")[1])
        [target] = rule["target_matchers"]
        targets = target.split("=~ ")[1].strip('"').split("|")
        assert set(targets) <= rules and "LlamaTokensPerSecondDropped" in targets
    assert sources == {"LlamaTargetDown", "LlamaRouterDown"} and sources <= rules


def test_prometheus_sends_to_the_local_alertmanager_once_a_receiver_is_set():
    conf = yaml.safe_load(render("monitor/prometheus.yml.j2", scrape_interval="15s", rules_file="/r.yml", key_file=None,
                                 servers_file="/s.json", fronts_file="/f.json", listen="10.0.0.9:9090",
                                 models_file=None, alertmanager="127.0.0.1:9093", nodes_file="/n.json"))
    assert conf["alerting"] == {"alertmanagers": [{"static_configs": [{"targets": ["127.0.0.1:9093"]}]}]}


def test_alertmanager_listens_on_the_loopback_without_a_cluster():
    from llamadeploy.roles.monitor import alertmanager_args

    assert alertmanager_args(9093) == ('ARGS="--config.file=/etc/prometheus/alertmanager.yml '
                                       '--web.listen-address=127.0.0.1:9093 --cluster.listen-address="\n')
    assert not monitor_cfg().monitor.alertmanager.enabled
    assert monitor_cfg(email=EMAIL).monitor.alertmanager.enabled


@pytest.mark.parametrize("am, field", [
    ({"webhook": {"url": "http://x/\nfoo: bar"}}, "webhook.url"),
    ({"webhook": {"url": "ftp://x/"}}, "webhook.url"),
    ({"email": {**EMAIL, "to": ["ops@example.com\nbcc: x@y"]}}, "email.to.0"),
    ({"email": {**EMAIL, "to": []}}, "email.to"),
    ({"email": {**EMAIL, "smarthost": "smtp.example.com"}}, "email.smarthost"),
    ({"email": {**EMAIL, "password": "hunter2"}}, "email.password"),  # a secret in the inventory: no such field
    ({"group_wait": "soon"}, "group_wait"),
])
def test_bad_receivers_are_refused_with_the_field(am, field):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as exc:
        monitor_cfg(**am)
    assert any(".".join(str(p) for p in e["loc"]).endswith(f"alertmanager.{field}") for e in exc.value.errors()), exc.value


def test_secret_files_of_receivers_must_be_the_operators_alone(tmp_path):
    from llamadeploy.hostdata import controller_file_problems

    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o644)
    c = monitor_cfg(webhook={"url": "https://h.example.com/", "token_file": str(token)},
                    email={**EMAIL, "password_file": str(tmp_path / "missing")})
    problems = controller_file_problems("mon1", c)
    assert any(p.startswith(f"host mon1: llama_monitor.alertmanager.webhook.token_file = '{token}': mode 644") for p in problems)
    assert any("llama_monitor.alertmanager.email.password_file" in p and "No such file" in p for p in problems)
    token.chmod(0o600)
    assert not [p for p in controller_file_problems("mon1", c) if "token_file" in p]


def test_every_host_of_a_monitored_inventory_is_a_node_target():
    """Servers, fronts, RPC workers and the monitor itself, at their fleet addresses; a host that
    turned its node exporter off is not scraped."""
    from pyinfra.api import Inventory

    from llamadeploy.roles.monitor import node_targets

    open_server = {"llama_server": {"allow_unauthenticated": True}}
    inv = Inventory((["10.0.0.1", ("10.0.0.2", {"llama_node_exporter": {"enabled": False}, **open_server}),
                      ("10.0.0.3", {"llama_role": "front"}), ("10.0.0.4", {"llama_role": "monitor"}),
                      ("10.0.0.5", {"llama_role": "rpc_worker", "llama_transfer": {"address": "192.168.7.5"}})],
                     open_server))
    assert node_targets(inv) == [{"targets": ["10.0.0.1:9100", "10.0.0.3:9100", "10.0.0.4:9100", "192.168.7.5:9100"],
                                  "labels": {"fleet": "llama"}}]


def test_node_exporter_arguments_bind_the_fleet_address_and_watch_the_deploys_units():
    from llamadeploy.roles.node_exporter import node_args, watched_units

    text = node_args("10.0.0.1:9100", watched_units(HostConfig.model_validate(
        {"model": {"path": "/m.gguf"}, "server": {"allow_unauthenticated": True}})))
    assert text.startswith('ARGS="--web.listen-address=10.0.0.1:9100 --collector.systemd ')
    assert "--collector.systemd.enable-restarts-metrics" in text
    # $ARGS is split at whitespace without quote removal: one word, no quote, no backslash
    include = next(w for w in text.split() if w.startswith("--collector.systemd.unit-include="))
    assert "'" not in include and "\\" not in include
    assert include.split("=", 1)[1].rstrip('"').startswith("(llama-server[.]service|")


# --- which models a front routes to a server: routing_of ----------------------------------------

def _manifest(models: tuple[str, ...] = (), alias: str = "old", parallel: int = 3):
    from llamadeploy.manifest import Manifest, PlanRecord, ServedModel

    sha = "a" * 64
    return Manifest(mode="native", unit="llama-server", host="0.0.0.0", port=8080, alias=alias,
                    model_path="/m.gguf", model_files={"m.gguf": sha}, release="r", args=[],
                    memory_plan=PlanRecord(limit=1, model_bytes=1, kv_bytes_per_token=1, ctx_size=512,
                                           parallel=parallel),
                    models=[ServedModel(alias=a, kind="chat", files={"m.gguf": sha}) for a in models])


def _server(models: list[str] | None = None, alias: str | None = None) -> HostConfig:
    gemma = {"path": "/m.gguf"}
    if models:
        return HostConfig.model_validate({"models": [{**gemma, "alias": a} for a in models],
                                          "server": {"allow_unauthenticated": True}})
    return HostConfig.model_validate({"model": {**gemma, **({"alias": alias} if alias else {})},
                                      "server": {"allow_unauthenticated": True}})


def test_a_server_this_run_deploys_is_routed_what_its_inventory_gives_it():
    from llamadeploy.roles.front import routing_of

    rolled_back = _manifest(("chat", "chat-b"))
    assert routing_of(_server(["chat", "idle-b"]), rolled_back, in_run=True) == (("chat", "idle-b"), True)
    assert routing_of(_server(alias="one"), rolled_back, in_run=True) == (("one",), False)
    assert routing_of(_server(), _manifest(alias="served"), in_run=True) == (("served",), False)
    assert routing_of(_server(), None, in_run=True) == ((), False)


def test_a_server_outside_the_run_is_routed_what_its_release_serves_now():
    """After ``llamadeploy rollback`` the inventory may lack a model the reinstated release
    serves (or list one it does not): the front follows the release."""
    from llamadeploy.roles.front import routing_of

    assert routing_of(_server(["chat", "idle-b"]), _manifest(("chat", "chat-b")), in_run=False) == (
        ("chat", "chat-b"), True)
    # a router in the inventory, a one-model release on the host: one alias, no routing by model
    assert routing_of(_server(["chat", "idle-b"]), _manifest(alias="solo"), in_run=False) == (("solo",), False)
    # a one-model inventory, a router release brought back: routed by model
    assert routing_of(_server(alias="one"), _manifest(("a", "b")), in_run=False) == (("a", "b"), True)
    # never deployed: its inventory's
    assert routing_of(_server(["chat", "idle-b"]), None, in_run=False) == (("chat", "idle-b"), True)


def test_slots_come_from_the_release_else_the_setting():
    from llamadeploy.roles.front import slots_of

    assert slots_of(_server(alias="one"), _manifest(parallel=3)) == 3
    assert slots_of(_server(alias="one"), None) == 8


def test_a_server_outside_the_run_is_scraped_for_the_models_its_release_serves(tmp_path):
    """The monitor follows a rolled-back release as the front does: ``serving`` (from its
    manifest, roles/front routing_of) replaces the inventory's models for that server."""
    from pyinfra.api import Inventory

    from llamadeploy.roles.monitor import targets

    model = tmp_path / "a.gguf"
    model.write_bytes(b"GGUF")
    routed = {"llama_server": {"allow_unauthenticated": True},
              "llama_models": [{"path": str(model), "alias": "chat"}, {"path": str(model), "alias": "idle-b"}]}
    inv = Inventory((["10.0.0.1", ("10.0.0.2", routed)], {"llama_server": {"allow_unauthenticated": True}}))
    servers, _, _, models = targets(inv, {"10.0.0.2": (("chat", "chat-b"), True)})
    assert servers[0]["targets"] == ["10.0.0.1:8080"]
    assert [m["labels"]["model"] for m in models] == ["chat", "chat-b"]
    # a one-model release brought back on a server the inventory makes a router: one target, no model job
    servers, _, _, models = targets(inv, {"10.0.0.2": (("solo",), False)})
    assert servers[0]["targets"] == ["10.0.0.1:8080", "10.0.0.2:8080"] and models == []
