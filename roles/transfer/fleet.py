"""One fan-out's shared state on the controller: members, holders, rounds, progress.

Every host registers while pyinfra prepares (its address, destination, whether it holds a
verified copy); the plan is made when the operations execute, round by round, from who
actually holds the file by then (:mod:`.plan`). pyinfra runs hosts as gevent greenlets in
one process, so this plain state is shared by all of them without locks.
"""

from __future__ import annotations

import posixpath
import secrets
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from weakref import WeakKeyDictionary

from pyinfra.api.inventory import Inventory

from llamadeploy import atomic
from llamadeploy.roles.firewall import GUARD_SHELL, guard_unit
from llamadeploy.roles.firewall.operations import MARK
from llamadeploy.roles.transfer.plan import plan_round, seed

#: peer servers are transient units ``llamadeploy-peer-<run>.service``: a name of their own per
#: run, since systemd may keep a stopped transient unit loaded for a while
UNIT_GLOB = "llamadeploy-peer-*.service"
#: nftables tables of the fences: ``llamadeploy_peer_<run>``, one per unit, so that a stale
#: unit's ``ExecStopPost`` never removes the fence of the current one (identifiers take no '-')
TABLE_PREFIX = "llamadeploy_peer"
MIB = 1 << 20


@dataclass
class Member:
    host: str
    address: str  #: where the other hosts reach this one
    dest: str  #: the verified file on this host (what it serves once it holds it)
    serve_dir: str  #: directory of links the peer server serves (by sha256)
    holds: bool  #: held a verified copy when the run was prepared
    mode: str = "0644"


@dataclass
class Fleet:
    key: str
    label: str
    controller_path: str
    #: the file's sha256; None: read from ``<controller_path>.sha256`` when the transfer runs
    #: (a release built earlier in the same run)
    expected_sha256: str | None
    port: int
    per_receiver: int
    timeout: int
    members: dict[str, Member] = field(default_factory=dict)
    holders: list[str] = field(default_factory=list)
    needing: list[str] = field(default_factory=list)
    served: set[str] = field(default_factory=set)
    #: round -> receiver -> sources; made once per round, when its first operation executes
    rounds: dict[int, dict[str, list[str]]] = field(default_factory=dict)
    #: round -> the sources whose server really answered (a failed serve is no source)
    serving: dict[int, set[str]] = field(default_factory=dict)
    started_at: float | None = None
    peer_bytes: int = 0
    pushed: int = 0
    unit: str = field(default_factory=lambda: f"llamadeploy-peer-{secrets.token_hex(4)}.service")
    _sha: str | None = None
    _push_t0: float = 0.0
    _active: list[str] | None = None

    # -- execution-time state -------------------------------------------------
    def _start(self) -> None:
        """First call at execution: who is still in the run, who holds, who needs."""
        if self._active is not None:
            return
        from pyinfra import host

        active = {h.name for h in host.state.active_hosts}
        order = [h.name for h in host.inventory]  # the seed and rounds follow the inventory
        self._active = sorted((n for n in self.members if n in active), key=order.index)
        self.holders = [n for n in self._active if self.members[n].holds]
        self.needing = [n for n in self._active if not self.members[n].holds]
        self.started_at = time.monotonic()

    def sha256(self) -> str:
        if self._sha is None:
            if self.expected_sha256:
                self._sha = self.expected_sha256
            else:
                from llamadeploy.roles.build.artifact import artifact_sha256

                found = artifact_sha256(Path(self.controller_path))
                if found is None:
                    raise RuntimeError(f"no {self.controller_path}.sha256 on the controller for {self.label}")
                self._sha = found
        return self._sha

    def size(self) -> int:
        return Path(self.controller_path).stat().st_size

    def seed(self) -> str | None:
        self._start()
        return seed(self.needing, self.holders)

    def plan(self, round_no: int) -> dict[str, list[str]]:
        self._start()
        if round_no not in self.rounds:
            self.rounds[round_no] = plan_round(self.needing, self.holders, self.per_receiver)
        return self.rounds[round_no]

    def sources(self, round_no: int) -> set[str]:
        return {s for srcs in self.plan(round_no).values() for s in srcs}

    def live_sources(self, round_no: int, receiver: str) -> list[str]:
        """The receiver's planned sources whose server answered this round."""
        up = self.serving.get(round_no, set())
        return [s for s in self.plan(round_no).get(receiver, []) if s in up]

    @property
    def table(self) -> str:
        return f"{TABLE_PREFIX}_{self.unit.removeprefix('llamadeploy-peer-').removesuffix('.service')}"

    def received(self, name: str, size: int, took: float, source: str) -> bool:
        """A host verified its copy: it is a holder from the next round on; print progress."""
        if name in self.needing:
            self.needing.remove(name)
        if name not in self.holders:
            self.holders.append(name)
        if source == "the controller":
            self.pushed += size
        else:
            self.peer_bytes += size
        total = len(self._active or [])
        rate = f" in {took:.1f}s ({size / MIB / took:.0f} MiB/s)" if took > 0 else ""
        sys.stderr.write(f"    fan-out {self.label}: {name} has it from {source}{rate}; "
                         f"{len(self.holders)}/{total} hosts done\n")
        return True

    def push_started(self) -> bool:
        self._push_t0 = time.monotonic()
        return True

    def pushed_to(self, name: str) -> bool:
        return self.received(name, self.size(), time.monotonic() - self._push_t0, "the controller")

    def last_member(self) -> str | None:
        return self._active[-1] if self._active else None

    def report(self) -> None:
        """One line when the fan-out is over: hosts, bytes from the controller and between peers."""
        if self.started_at is None or (not self.pushed and not self.peer_bytes):
            return
        took = time.monotonic() - self.started_at
        moved = self.pushed + self.peer_bytes
        sys.stderr.write(
            f"    fan-out {self.label}: {len(self.holders)}/{len(self._active or [])} hosts hold it; "
            f"{self.pushed / MIB:.0f} MiB from the controller, {self.peer_bytes / MIB:.0f} MiB between peers, "
            f"{took:.1f}s ({moved / MIB / took:.0f} MiB/s overall)\n")

    # -- shell ----------------------------------------------------------------
    def fence_rules(self) -> str:
        """nftables: the port is dropped for every address but the run's hosts (pure)."""
        import ipaddress

        addrs = [ipaddress.ip_address(m.address) for m in self.members.values()]
        v4 = ", ".join(sorted(str(a) for a in addrs if a.version == 4))
        v6 = ", ".join(sorted(str(a) for a in addrs if a.version == 6))
        # declare-then-delete: loading the file replaces the table as a whole (nft -f is atomic)
        lines = [f"table inet {self.table} {{}}", f"delete table inet {self.table}", f"table inet {self.table} {{",
                 f'  comment "{MARK}fan-out {self.port}"',  # the deploy's mark: only such tables are removed
                 "  chain input {",
                 "    type filter hook input priority -10; policy accept;"]
        if v4:
            lines.append(f"    ip saddr {{ {v4} }} tcp dport {self.port} accept")
        if v6:
            lines.append(f"    ip6 saddr {{ {v6} }} tcp dport {self.port} accept")
        lines += [f"    tcp dport {self.port} drop", "  }", "}"]
        return "\n".join(lines) + "\n"

    @property
    def guard_unit(self) -> str:
        """The transient guard that keeps the peer's fence loaded (see :meth:`serve_command`)."""
        return guard_unit(self.unit.removesuffix(".service"))  # every fence's guard is named alike

    def serve_command(self, name: str) -> str:
        """Shell: link the verified copy under its sha256, start the fenced server, wait for it.

        The fence is an nftables table, which anybody may flush (``systemctl restart nftables``,
        ``nft flush ruleset``) while the peer serves. So a transient guard runs the firewall
        role's own guard shell (``firewall.GUARD_SHELL``), which loads the table again whenever it
        goes, and the server is bound to it (``BindsTo=``): when the table cannot be loaded, the
        server stops. A transient unit outlives no reboot, so no nftables drop-in is needed."""
        q = shlex.quote
        m = self.members[name]
        sha = self.sha256()
        rules = f"{m.serve_dir}/fence.nft"
        guard_sh = f"{m.serve_dir}/fence-guard.sh"
        link = f"{m.serve_dir}/files/{sha}"
        url = f"http://{_url_host(m.address)}:{self.port}/{sha}"
        verified = atomic.VerifiedSha256().command(m.dest)
        guard = [
            "systemd-run", "--quiet", "--collect", f"--unit={self.guard_unit}", f"--property=RuntimeMaxSec={self.timeout}",
            "--property=After=nftables.service", f"--property=PartOf={self.unit}", "--property=NoNewPrivileges=yes",
            "--property=ProtectSystem=strict", "--property=ProtectHome=read-only", "--property=PrivateTmp=yes",
            "--property=CapabilityBoundingSet=CAP_NET_ADMIN", "--property=RestrictAddressFamilies=AF_NETLINK AF_UNIX",
            # its table goes with it: the peer's own ExecStopPost may run while the guard still
            # watches, and the guard would load the table again
            f"--property=ExecStopPost=-/usr/sbin/nft delete table inet {self.table}",
            "/bin/sh", guard_sh, self.table, rules,
        ]
        run = [
            "systemd-run", "--quiet", "--collect", f"--unit={self.unit}", "--property=DynamicUser=yes",
            f"--property=BindsTo={self.guard_unit}", f"--property=After={self.guard_unit}",
            f"--property=RuntimeMaxSec={self.timeout}", "--property=NoNewPrivileges=yes",
            "--property=ProtectSystem=strict", "--property=ProtectHome=yes", "--property=PrivateTmp=yes",
            f"--property=ExecStartPre=+/usr/sbin/nft -f {rules}",
            f"--property=ExecStopPost=-+/usr/sbin/nft delete table inet {self.table}",
            "/bin/busybox", "httpd", "-f", "-p", f"{_url_host(m.address)}:{self.port}", "-h", f"{m.serve_dir}/files",
        ]
        return (
            # serve only a copy that is verified now
            f"[ \"$({verified} | cut -d' ' -f1)\" = {q(sha)} ] || {{ echo {q(m.dest)} is not verified >&2; exit 1; }}; "
            f"mkdir -p {q(m.serve_dir)}/files && chmod 755 {q(m.serve_dir)} {q(m.serve_dir)}/files && "
            f"ln -sfn {q(m.dest)} {q(link)} && "
            # written aside and renamed: a running guard reads the rules (and its script) at any moment
            f"printf %s {q(self.fence_rules())} > {q(rules)}.new && mv -f {q(rules)}.new {q(rules)} && "
            f"printf %s {q(GUARD_SHELL)} > {q(guard_sh)}.new && mv -f {q(guard_sh)}.new {q(guard_sh)} && "
            # a peer server an earlier, killed run left is stopped first (it stops by itself later)
            f"for u in $(systemctl list-units --plain --no-legend {q(UNIT_GLOB)} | awk '{{print $1}}'); do "
            f"case \"$u\" in {q(self.unit)}|{q(self.guard_unit)}) ;; *) systemctl stop \"$u\" ;; esac; done; "
            # this run's peer (re)started with a guard of its own: a failed one is cleared first
            f"if ! systemctl is-active --quiet {self.unit}; then systemctl stop {self.guard_unit} 2>/dev/null; "
            f"systemctl reset-failed {self.unit} {self.guard_unit} 2>/dev/null; "
            f"{' '.join(q(a) for a in guard)} && {' '.join(q(a) for a in run)}; fi && "
            f"for i in $(seq 50); do curl -fsI -o /dev/null {q(url)} && exit 0; sleep 0.1; done; "
            f"echo peer server did not answer at {q(url)} >&2; exit 1"
        )

    def pull_command(self, name: str, sources: list[str]) -> str:
        """Shell: aria2c from ``sources`` into ``dest.partial`` (resumable), then verify and rename."""
        q = shlex.quote
        m = self.members[name]
        sha = self.sha256()
        tmp = f"{m.dest}.partial"
        urls = [f"http://{_url_host(self.members[s].address)}:{self.port}/{sha}" for s in sources]
        aria = [
            "aria2c", "--no-conf", "--quiet=true", f"--dir={posixpath.dirname(m.dest)}", f"--out={posixpath.basename(tmp)}",
            "--continue=true", "--allow-overwrite=false", "--auto-file-renaming=false", "--file-allocation=none",
            f"--split={len(urls)}", "--max-connection-per-server=1", "--min-split-size=8M",
            "--connect-timeout=5", "--timeout=20", "--auto-save-interval=1", "--max-tries=3", "--retry-wait=1", "--lowest-speed-limit=1M",
            "--max-file-not-found=2", "--uri-selector=inorder", *urls,
        ]
        return (f"mkdir -p {q(posixpath.dirname(m.dest))} && {' '.join(q(a) for a in aria)} && "
                f"{atomic.install_if_hash_matches(tmp, m.dest, sha, m.mode, what=m.dest)} && rm -f {q(tmp)}.aria2")

    def stop_command(self, name: str) -> str:
        """Shell: the server stopped (its fence goes with it), the links removed; fails if it still runs."""
        q = shlex.quote
        units = q(UNIT_GLOB)
        marked = q(f'comment "{MARK}')  # a table the deploy loaded (roles/firewall MARK): only those go
        return (f"systemctl stop {units} 2>/dev/null; systemctl reset-failed {units} 2>/dev/null; "
                f"for t in $(nft list tables 2>/dev/null | awk '$3 ~ /^{TABLE_PREFIX}/ {{print $3}}'); do "
                f"nft list table inet \"$t\" | grep -q {marked} && nft delete table inet \"$t\"; "
                f"done; rm -rf {q(self.members[name].serve_dir)}; "
                f"! systemctl is-active --quiet {units}")


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


#: per pyinfra run (its inventory): shipment key -> fleet
_FLEETS: WeakKeyDictionary[Inventory, dict[str, Fleet]] = WeakKeyDictionary()


def fleet_for(inventory: Inventory, key: str) -> Fleet:
    return _FLEETS[inventory][key]


def register(inventory: Inventory, fleet: Fleet, member: Member) -> Fleet:
    """Add this host to the run's fan-out of ``fleet.key`` (the first host creates it)."""
    fleets = _FLEETS.setdefault(inventory, {})
    shared = fleets.setdefault(fleet.key, fleet)
    shared.members[member.host] = member
    return shared
