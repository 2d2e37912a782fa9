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
                                 models_file=None))
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    assert jobs["llama-server"]["file_sd_configs"] == [{"files": ["/s.json"]}]
    assert jobs["haproxy"]["file_sd_configs"] == [{"files": ["/f.json"]}]
    assert ("authorization" in jobs["llama-server"]) == (key_file is not None)
    if key_file:
        assert jobs["llama-server"]["authorization"] == {"type": "Bearer", "credentials_file": key_file}
    assert conf["rule_files"] == ["/r.yml"]
    assert jobs["prometheus"]["static_configs"] == [{"targets": ["10.0.0.9:9090"]}]  # where it listens


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
                          "LlamaTokensPerSecondDropped", "LlamaFrontBackendDown", "LlamaRouterDown"}
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
                                 models_file="/m.json"))
    job = next(j for j in conf["scrape_configs"] if j["job_name"] == "llama-server-models")
    assert job["file_sd_configs"] == [{"files": ["/m.json"]}]
    plain = yaml.safe_load(render("monitor/prometheus.yml.j2", scrape_interval="15s", rules_file="/r.yml",
                                  key_file=None, servers_file="/s.json", fronts_file="/f.json", listen="10.0.0.9:9090",
                                  models_file=None))
    assert [j["job_name"] for j in plain["scrape_configs"]] == ["llama-server", "haproxy", "prometheus"]
    rules = yaml.safe_load(render("monitor/llamadeploy-rules.yml.j2"))["groups"][0]["rules"]
    down = {r["alert"]: r["expr"] for r in rules}
    assert down["LlamaTargetDown"] == 'up{job=~"llama-server|haproxy"} == 0'  # an unloaded model is no alert
    assert down["LlamaRouterDown"] == 'max by (instance) (up{job="llama-server-models"}) == 0'
