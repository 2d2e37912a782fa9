"""Monitor role (hosts with ``llama_role = "monitor"``): Prometheus from the distribution.

Scrape targets are generated from the inventory (file_sd): every llama-server's
``/metrics`` (with the API key from a 0600 file where the servers require one), and
every front's HAProxy exporter. Alert rules: a target down, requests deferred by
llama-server or queued at the front, tokens/s dropping, a backend taken out by the
front. Config and rules are checked with ``promtool`` before they replace the old
ones; Prometheus is reloaded, not restarted.

Alerts reach a person through Alertmanager (``llama_monitor.alertmanager``): Debian's
``prometheus-alertmanager`` on the same host, on its loopback, with the inventory's webhook
and e-mail receivers; their secrets are pushed from 0600 controller files into 0600 files the
config names (``credentials_file``, ``auth_password_file``), never into the config itself. The
config is checked with ``amtool check-config`` before it replaces the old one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from io import StringIO
from pathlib import Path

from pyinfra import host
from pyinfra.api import DeployError
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import FileContents
from pyinfra.facts.systemd import SystemdEnabled
from pyinfra.operations import files, systemd

from llamadeploy import atomic, packages
from llamadeploy.config import HostConfig
from llamadeploy.hostdata import validate_inventory
from llamadeploy.render import render
from llamadeploy.roledeploy import role
from llamadeploy.roles.firewall import fence_entries, port_fenced
from llamadeploy.roles.front import address, deployed, exporter_address, host_port, routing_of
from llamadeploy.roles.transfer import peer_address

ETC = "/etc/prometheus"
SERVERS = f"{ETC}/llamadeploy-servers.json"
FRONTS = f"{ETC}/llamadeploy-fronts.json"
#: router-mode servers: one target per model (``/metrics?model=X&autoload=false``)
MODELS = f"{ETC}/llamadeploy-models.json"
#: every host's node exporter (roles/node_exporter)
NODES = f"{ETC}/llamadeploy-nodes.json"
RULES = f"{ETC}/llamadeploy-rules.yml"
KEY = f"{ETC}/llama-api-key"
#: Prometheus's fence (roles/firewall): table and rules file
TABLE = "llamadeploy_prometheus"
FENCE_RULES = f"{ETC}/llamadeploy-fence.nft"
#: Alertmanager (Debian's paths: its unit reads ARGS from the defaults file)
AM_CONFIG = f"{ETC}/alertmanager.yml"
AM_DEFAULTS = "/etc/default/prometheus-alertmanager"
AM_TOKEN = f"{ETC}/alertmanager-webhook-token"
AM_PASSWORD = f"{ETC}/alertmanager-smtp-password"
#: the files the deploy adds beside Prometheus' and Alertmanager's own: no package ships them, so
#: the purge keeps them (and /etc/prometheus); uninstall removes them where the deploy installed
#: those packages (roles/uninstall/plan.py)
PROMETHEUS_FILES = (SERVERS, FRONTS, MODELS, NODES, RULES, KEY)
ALERTMANAGER_FILES = (AM_TOKEN, AM_PASSWORD)
AM_SERVICE = "prometheus-alertmanager.service"


def alertmanager_args(port: int) -> str:
    """The defaults file: loopback only, and no cluster. Debian's default listens on every address
    and gossips with peers on 9094, unauthenticated; one Alertmanager per monitor needs neither."""
    return f'ARGS="--config.file={AM_CONFIG} --web.listen-address=127.0.0.1:{port} --cluster.listen-address="\n'


def secret_text(path: str) -> str:
    """A secret from its controller file, without the trailing newline an editor adds (Alertmanager
    sends a password file's bytes as they are)."""
    return Path(path).read_text().strip()


def targets(inventory, serving: Mapping[str, tuple[tuple[str, ...], bool]] | None = None
            ) -> tuple[list[dict], list[dict], str | None, list[dict]]:
    """file_sd groups for the servers, the fronts and the models of router-mode servers, and the
    key the servers need (pure but for the inventory). Servers with different keys cannot share
    one scrape job: refused. ``serving``: server name -> (aliases, runs a router) where that is not
    what the inventory says (a server this run does not deploy: its release's, as the front routes
    it, roles/front :func:`routing_of`).

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
            aliases, router = (serving or {}).get(h.name) or (tuple(m.alias for m in c.models), c.router_mode)
            if router:
                models += [{"targets": [target], "labels": {"fleet": "llama", "model": alias,
                                                            "__param_model": alias, "__param_autoload": "false"}}
                           for alias in aliases]
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


def listen_address(cfg: HostConfig, h) -> str:
    """``address:port`` where monitor ``h``'s Prometheus listens: ``llama_monitor.bind``, else its
    fleet address. The monitor binds it and ``llamadeploy dashboards export`` points Grafana at it."""
    m = cfg.monitor
    return host_port(str(m.bind) if m.bind else peer_address(cfg, h), m.port)


def node_targets(inventory) -> list[dict]:
    """file_sd group of every host's node exporter (roles/node_exporter), at its fleet address."""
    configs = validate_inventory(inventory)
    nodes = [host_port(peer_address(configs[h.name], h), configs[h.name].node_exporter.port)
             for h in inventory if configs[h.name].node_exporter.enabled]
    return [{"targets": nodes, "labels": {"fleet": "llama"}}] if nodes else []


def owned_entries(cfg: HostConfig) -> list[str]:
    """What a monitor's deploy writes beside Prometheus' and Alertmanager's own files, for its
    ownership record (pure; roles/ownership): the targets, rules and key files it may write,
    Alertmanager's secret files when it runs one, and Prometheus' fence."""
    written = [*PROMETHEUS_FILES, *(ALERTMANAGER_FILES if cfg.monitor.alertmanager.enabled else ())]
    return [*(f"file {p}" for p in written), *fence_entries("prometheus", TABLE, FENCE_RULES)]


@role("Monitor (Prometheus)")
def monitor(cfg: HostConfig) -> None:
    configs = validate_inventory(host.inventory)
    # servers this run does not deploy are scraped for the models their release serves now
    serving = {h.name: routing_of(configs[h.name], deployed(h, configs[h.name]), in_run=False)
               for h in host.inventory if configs[h.name].role == "server" and not host.state.is_host_in_limit(h)}
    servers, fronts, key, models = targets(host.inventory, serving)
    m = cfg.monitor
    packages.refuse_foreign(cfg, "monitor", ["prometheus", *(["prometheus-alertmanager"] if m.alertmanager.enabled else [])],
                            "llama_role = 'monitor'", "a host whose Prometheus and Alertmanager this deploy installs "
                            "(remove the other ones first)")
    listen = listen_address(cfg, host)
    # the fence and the arguments come before the package, whose postinst starts Prometheus at
    # once: it starts fenced, on the fleet address (Debian's default is every address), and is
    # not restarted seconds later, the pattern that failed the node exporter with 219/CGROUP
    # (see roles/node_exporter). apt keeps an /etc/default file that is already there
    port_fenced(cfg, "prometheus", TABLE, FENCE_RULES, m.port, [str(n) for n in m.allow_from], "llama_role = 'monitor'")
    args = atomic.put(name="Prometheus listen address and retention (/etc/default/prometheus)",
                      src=StringIO(f'ARGS="--web.listen-address={listen} --storage.tsdb.retention.time={m.retention}"\n'),
                      dest="/etc/default/prometheus", mode="644")
    installed = packages.installed(cfg, "monitor", name="Prometheus (with promtool)", packages=["prometheus"],
                                   update=True, cache_time=24 * 3600, no_recommends=True)
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
    atomic.put(name="Scrape targets: node exporters", src=StringIO(json.dumps(node_targets(host.inventory), indent=1) + "\n"),
               dest=NODES, mode="644")
    if models:
        atomic.put(name="Scrape targets: models of router-mode servers", src=StringIO(json.dumps(models, indent=1) + "\n"),
                   dest=MODELS, mode="644")
    else:
        files.file(name="No router-mode models to scrape", path=MODELS, present=False)
    am = cfg.monitor.alertmanager
    alerting = alertmanager(cfg) if am.enabled else alertmanager_off(cfg)
    rules = atomic.put(name="Alert rules (promtool check rules)", src=StringIO(render("monitor/llamadeploy-rules.yml.j2")),
                       dest=RULES, mode="644", check="promtool check rules {path} >/dev/null")
    conf = atomic.put(
        name="prometheus.yml (promtool check config)",
        src=StringIO(render("monitor/prometheus.yml.j2", scrape_interval=m.scrape_interval, rules_file=RULES,
                            key_file=KEY if key else None, servers_file=SERVERS, fronts_file=FRONTS, listen=listen,
                            models_file=MODELS if models else None, nodes_file=NODES,
                            alertmanager=f"127.0.0.1:{am.port}" if alerting else None)),
        dest=f"{ETC}/prometheus.yml", mode="644",
        # promtool resolves rule_files relative to the checked file: check the staged copy in place
        check="promtool check config --syntax-only {path} >/dev/null",
    )
    started = systemd.service(name="Prometheus enabled and running", service="prometheus.service", running=True,
                              enabled=True)
    restarted_or_reloaded(service="prometheus.service", what="Prometheus", installed=installed, started=started,
                          args=args, configs=(conf, rules, key_op), configs_label="config, rules, key")


def alertmanager(cfg: HostConfig) -> bool:
    """Alertmanager installed, configured (``amtool check-config``) and running; True.

    Secrets first, so that the config never names a file that is not there yet; a config change
    is a reload (Alertmanager re-reads its config and the files it names), new arguments a
    restart.
    """
    am = cfg.monitor.alertmanager
    # the arguments before the package, as for Prometheus: its postinst starts Alertmanager on
    # the loopback with no cluster port, and nothing restarts it in the same run
    args = atomic.put(name="Alertmanager on the loopback, no cluster (/etc/default/prometheus-alertmanager)",
                      src=StringIO(alertmanager_args(am.port)), dest=AM_DEFAULTS, mode="644")
    installed = packages.installed(cfg, "monitor", name="Alertmanager (with amtool)",
                                   packages=["prometheus-alertmanager"], update=True, cache_time=24 * 3600,
                                   no_recommends=True)
    token = am.webhook.token_file if am.webhook else None
    password = am.email.password_file if am.email else None
    secrets = []
    for label, source, dest in (("webhook token", token, AM_TOKEN), ("SMTP password", password, AM_PASSWORD)):
        if source:
            secrets.append(atomic.put(name=f"Alertmanager {label} (0600, prometheus)", src=StringIO(secret_text(source)),
                                      dest=dest, user="prometheus", group="prometheus", mode="600", secret=True))
        else:
            secrets.append(files.file(name=f"No Alertmanager {label}", path=dest, present=False))
    conf = atomic.put(
        name="alertmanager.yml (amtool check-config)",
        src=StringIO(render("monitor/alertmanager.yml.j2", am=am, token_file=AM_TOKEN if token else None,
                            password_file=AM_PASSWORD if password else None)),
        dest=AM_CONFIG, mode="644", check="amtool check-config {path} >/dev/null")
    started = systemd.service(name="Alertmanager enabled and running", service=AM_SERVICE, running=True, enabled=True)
    restarted_or_reloaded(service=AM_SERVICE, what="Alertmanager", installed=installed, started=started, args=args,
                          configs=(conf, *secrets), configs_label="config, secrets")
    return True


def restarted_or_reloaded(service: str, what: str, installed: OperationMeta, started: OperationMeta,
                          args: OperationMeta, configs: tuple[OperationMeta, ...], configs_label: str) -> None:
    """New arguments restart the service, new configs reload it; neither right after a start.

    A package installed in this run was started by its postinst with the arguments already in
    place (they are written before it), so only its config is reloaded: a stop seconds after
    that first start is what failed the node exporter with 219/CGROUP in the sandbox.
    """
    def restart() -> bool:
        return args.did_change() and not installed.did_change() and not started.did_change()

    systemd.service(name=f"Restart {what} for new arguments", service=service, restarted=True, _if=restart)
    systemd.service(name=f"Reload {what} ({configs_label})", service=service, reloaded=True,
                    _if=[lambda: any(op.did_change() for op in configs),
                         lambda: not started.did_change() and not restart()])


def alertmanager_off(cfg: HostConfig) -> bool:
    """No receiver configured: an Alertmanager an earlier deploy installed is stopped and its
    secrets go (uninstall purges the package); one the host had before is left alone. False."""
    ours = "prometheus-alertmanager" in packages.recorded(
        host.get_fact(FileContents, path=packages.record_path(cfg, "monitor")))
    if ours and host.get_fact(SystemdEnabled).get(AM_SERVICE):
        systemd.service(name="Alertmanager stopped (no receiver configured)", service=AM_SERVICE, running=False,
                        enabled=False)
    else:
        host.noop("no Alertmanager of this deploy to stop")
    for label, dest in (("webhook token", AM_TOKEN), ("SMTP password", AM_PASSWORD)):
        files.file(name=f"No Alertmanager {label}", path=dest, present=False)
    return False
