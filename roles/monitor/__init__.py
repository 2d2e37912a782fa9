"""Monitor role (hosts with ``llama_role = "monitor"``): Prometheus from the distribution.

Scrape targets are generated from the inventory (file_sd): every llama-server's
``/metrics`` (with the API key from a 0600 file where the servers require one), and
every front's HAProxy exporter. Alert rules: a target down, requests deferred by
llama-server or queued at the front, tokens/s dropping, a backend taken out by the
front. Config and rules are checked with ``promtool`` before they replace the old
ones; Prometheus is reloaded, not restarted.
"""

from __future__ import annotations

import json
from io import StringIO

from pyinfra import host
from pyinfra.api import DeployError
from pyinfra.operations import files, systemd

from llamadeploy import atomic, packages
from llamadeploy.config import HostConfig
from llamadeploy.hostdata import validate_inventory
from llamadeploy.render import render
from llamadeploy.roledeploy import role
from llamadeploy.roles.firewall import port_fenced
from llamadeploy.roles.front import address, exporter_address, host_port
from llamadeploy.roles.transfer import peer_address

ETC = "/etc/prometheus"
SERVERS = f"{ETC}/llamadeploy-servers.json"
FRONTS = f"{ETC}/llamadeploy-fronts.json"
#: router-mode servers: one target per model (``/metrics?model=X&autoload=false``)
MODELS = f"{ETC}/llamadeploy-models.json"
RULES = f"{ETC}/llamadeploy-rules.yml"
KEY = f"{ETC}/llama-api-key"
#: Prometheus's fence (roles/firewall): table and rules file
TABLE = "llamadeploy_prometheus"
FENCE_RULES = f"{ETC}/llamadeploy-fence.nft"


def targets(inventory) -> tuple[list[dict], list[dict], str | None, list[dict]]:
    """file_sd groups for the servers, the fronts and the models of router-mode servers, and the
    key the servers need (pure but for the inventory). Servers with different keys cannot share
    one scrape job: refused.

    A router answers ``/metrics`` only for a model (``?model=``; without one: 400), and a scrape
    without ``autoload=false`` would load an unloaded model. So each model of a router is a target
    of its own in the ``llama-server-models`` job, its URL parameters set from the target's
    ``__param_*`` labels. An unloaded model answers 400 "model is not loaded": that target is down
    on purpose, and the target-down alert leaves that job out (``LlamaRouterDown`` instead).
    """
    configs = validate_inventory(inventory)
    servers, fronts, models, keys = [], [], [], set()
    for h in inventory:
        c = configs[h.name]
        if c.role == "server":
            target = host_port(address(h), c.server.port)
            if c.router_mode:
                models += [{"targets": [target], "labels": {"fleet": "llama", "model": m.alias,
                                                            "__param_model": m.alias, "__param_autoload": "false"}}
                           for m in c.models]
            else:
                servers.append(target)
            keys.add(c.server.api_key.get_secret_value() if c.server.api_key else None)
        elif c.role == "front":
            fronts.append(host_port(exporter_address(c, h), c.front.metrics_port))
    if len(keys) > 1:
        raise DeployError("monitor: the servers use different API keys (or some none); one scrape job "
                          "needs one key: give every server the same llama_server.api_key_file")
    key = keys.pop() if keys else None
    return ([{"targets": servers, "labels": {"fleet": "llama"}}] if servers else [],
            [{"targets": fronts, "labels": {"fleet": "llama"}}] if fronts else [], key, models)


@role("Monitor (Prometheus)")
def monitor(cfg: HostConfig) -> None:
    servers, fronts, key, models = targets(host.inventory)
    m = cfg.monitor
    packages.installed(cfg, "monitor", name="Prometheus (with promtool)", packages=["prometheus"],
                       update=True, cache_time=24 * 3600, no_recommends=True)
    bind = str(m.bind) if m.bind else peer_address(cfg, host)
    listen = host_port(bind, m.port)
    if key is not None:
        key_op = atomic.put(name="API key for scraping (0600, prometheus)", src=StringIO(key + "\n"), dest=KEY,
                            user="prometheus", group="prometheus", mode="600", secret=True)
    else:
        key_op = files.file(name="No scrape key", path=KEY, present=False)
    # file_sd files are re-read by Prometheus itself: target changes need no reload
    atomic.put(name="Scrape targets: servers", src=StringIO(json.dumps(servers, indent=1) + "\n"), dest=SERVERS,
               mode="644")
    atomic.put(name="Scrape targets: fronts", src=StringIO(json.dumps(fronts, indent=1) + "\n"), dest=FRONTS,
               mode="644")
    if models:
        atomic.put(name="Scrape targets: models of router-mode servers", src=StringIO(json.dumps(models, indent=1) + "\n"),
                   dest=MODELS, mode="644")
    else:
        files.file(name="No router-mode models to scrape", path=MODELS, present=False)
    rules = atomic.put(name="Alert rules (promtool check rules)", src=StringIO(render("monitor/llamadeploy-rules.yml.j2")),
                       dest=RULES, mode="644", check="promtool check rules {path} >/dev/null")
    conf = atomic.put(
        name="prometheus.yml (promtool check config)",
        src=StringIO(render("monitor/prometheus.yml.j2", scrape_interval=m.scrape_interval, rules_file=RULES,
                            key_file=KEY if key else None, servers_file=SERVERS, fronts_file=FRONTS, listen=listen,
                            models_file=MODELS if models else None)),
        dest=f"{ETC}/prometheus.yml", mode="644",
        # promtool resolves rule_files relative to the checked file: check the staged copy in place
        check="promtool check config --syntax-only {path} >/dev/null",
    )
    # on the fleet address, fenced to allow_from: nothing open by default
    port_fenced(cfg, "prometheus", TABLE, FENCE_RULES, m.port, [str(n) for n in m.allow_from])
    args = atomic.put(name="Prometheus listen address and retention (/etc/default/prometheus)",
                      src=StringIO(f'ARGS="--web.listen-address={listen} --storage.tsdb.retention.time={m.retention}"\n'),
                      dest="/etc/default/prometheus", mode="644")
    started = systemd.service(name="Prometheus enabled and running", service="prometheus.service", running=True,
                              enabled=True)
    systemd.service(name="Restart Prometheus for new arguments", service="prometheus.service", restarted=True,
                    _if=[args.did_change, lambda: not started.did_change()])
    systemd.service(name="Reload Prometheus (config, rules, key)", service="prometheus.service", reloaded=True,
                    _if=[lambda: any(op.did_change() for op in (conf, rules, key_op)),
                         lambda: not started.did_change() and not args.did_change()])
