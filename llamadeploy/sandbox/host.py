"""Boot real systemd Debian hosts on this machine and reach them over SSH.

Why this exists: a new user wants to see the deploy work before pointing it at
a server, and every end-to-end claim of the project is checked against a real
host (systemd as PID 1, sshd, apt), not a mock. ``systemd-nspawn -b`` gives such
a host in about ten seconds from a cached debootstrap tree. Needs root.

Layout on disk (``LLAMACTL_CACHE``, default ``/var/cache/llamactl-ci``):

* ``rootfs-<release>/``  the debootstrap tree of each Debian release (bookworm, trixie), built
  once and reused
* ``hosts/<name>/``      a per-host copy of that tree, deleted on teardown
* ``ccache/``, ``apt-archives/``  shared by every host (ccache bind-mounted, the apt
  archive as an overlay with a layer per host) so that a second host (or a second
  test run on the same machine) reuses compiled objects and downloaded ``.deb``
  files instead of paying for them again
* ``ssh/id_ed25519``     the test key pair
* ``running.json``       hosts that are up, so a crashed run can be reaped
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("LLAMACTL_CACHE", "/var/cache/llamactl-ci"))
#: ssh_config for the sandbox network, for tools that speak plain OpenSSH (testinfra, ssh)
SSH_CONFIG = CACHE / "ssh" / "config"
#: Debian releases a sandbox host can run (``--distro``): the ones the project tests on
DISTROS = ("bookworm", "trixie")
DEFAULT_DISTRO = "bookworm"
HOSTS_DIR = CACHE / "hosts"
SSH_KEY = CACHE / "ssh" / "id_ed25519"
#: one known_hosts file per sandbox address, holding the key of the host booted there (OpenSSH
#: finds it by ``%h``; pyinfra by the inventory's ``ssh_known_hosts_file``)
KNOWN_HOSTS = CACHE / "ssh" / "known_hosts.d"
STATE = CACHE / "running.json"
#: private range used only for these hosts: host N gets 10.231.N.0/30
NET_PREFIX = "10.231"
#: hosts on a shared LAN (``lan=``) get 10.232.L.N/24 on the bridge ``vz-<lan>``: traffic between
#: them is bridged, and only what this machine itself sends leaves through the bridge device. L
#: follows from the LAN's name, so that two LANs up at once (test modules run in parallel) never
#: share a subnet
LAN_PREFIX = "10.232"


def lan_prefix(lan: str) -> str:
    """The first three octets of ``lan``'s /24: ``10.232.L`` with L in 1..250 from its name."""
    return f"{LAN_PREFIX}.{zlib.crc32(lan.encode()) % 250 + 1}"

BASE_PACKAGES = (
    "systemd,systemd-sysv,dbus,openssh-server,iproute2,curl,ca-certificates,sudo,procps,python3"
)

#: seconds for a quick command on this machine (ip, iptables, ps, ssh-keygen): it returns at once or hangs
COMMAND_TIMEOUT = 120
#: seconds for building the base tree with debootstrap (about a minute; a slow mirror takes longer)
#: or copying it for a host
TREE_TIMEOUT = 1200
#: seconds for one command run on a host over SSH (the tests' second channel: reads, systemctl)
SSH_TIMEOUT = 600


def _run(*cmd: str, check: bool = True, timeout: float = COMMAND_TIMEOUT, **kw) -> subprocess.CompletedProcess:
    """``cmd`` on this machine; a hung command raises ``subprocess.TimeoutExpired`` after ``timeout`` s."""
    return subprocess.run(cmd, check=check, text=True, capture_output=True, timeout=timeout, **kw)


def _debian_mirror() -> str:
    """The Debian mirror this machine uses (CI can reach only that one)."""
    src = Path("/etc/apt/sources.list.d/debian.sources")
    if src.exists():
        for line in src.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    return "http://deb.debian.org/debian"


def rootfs(distro: str = DEFAULT_DISTRO) -> Path:
    """Where the base tree of Debian ``distro`` is cached."""
    if distro not in DISTROS:
        raise ValueError(f"sandbox distro {distro!r}: allowed {', '.join(DISTROS)}")
    return CACHE / f"rootfs-{distro}"


def ensure_rootfs(distro: str = DEFAULT_DISTRO) -> Path:
    """Build the cached base tree of ``distro`` once (about a minute); later calls are free."""
    tree = rootfs(distro)
    done = tree / ".llamactl-complete"
    if done.exists():
        return tree
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".rootfs-{distro}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return tree
        shutil.rmtree(tree, ignore_errors=True)
        tmp = CACHE / f"rootfs-{distro}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _run(
            "debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}",
            distro, str(tmp), _debian_mirror(), timeout=TREE_TIMEOUT,
        )
        _run("chroot", str(tmp), "systemctl", "enable", "ssh", "systemd-networkd")
        # apt inside the host keeps downloaded .debs so the shared archive fills up
        (tmp / "etc/apt/apt.conf.d/99keep-debs").write_text('Binary::apt::APT::Keep-Downloaded-Packages "true";\n')
        (tmp / ".llamactl-complete").touch()
        tmp.rename(tree)
    return tree


def ensure_ssh_key() -> Path:
    if not SSH_KEY.exists():
        SSH_KEY.parent.mkdir(parents=True, exist_ok=True)
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(SSH_KEY))
    return SSH_KEY


def _load_state() -> dict:
    try:
        return json.loads(STATE.read_text())
    except (FileNotFoundError, ValueError):
        return {}


@contextlib.contextmanager
def _state() -> Iterator[dict]:
    """The state file, read, changed by the caller and written back under an exclusive lock:
    test modules boot and stop hosts from several processes at once (pytest-xdist workers)."""
    STATE.parent.mkdir(parents=True, exist_ok=True)
    with open(STATE.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = _load_state()
        yield state
        tmp = STATE.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(STATE)


def owner() -> int:
    """The process a host booted now belongs to: ``$LLAMADEPLOY_SANDBOX_OWNER`` (a test process
    whose child boots it, as molecule's create step does), else this one."""
    return int(os.environ.get("LLAMADEPLOY_SANDBOX_OWNER") or os.getpid())


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class SandboxHost:
    """One booted host. ``index`` picks its /30 network and must be unique."""

    name: str
    index: int
    docker: bool = False
    pid: int | None = None
    binds: dict[str, str] = field(default_factory=dict)
    #: shared directory -> where the host sees it, with a layer of its own on top (overlayfs):
    #: hosts never share its locks (apt's archive lock), and what they add is merged back on stop
    overlays: dict[str, str] = field(default_factory=dict)
    #: a zone name: the host joins the bridge ``vz-<lan>`` with the other hosts of that LAN, as
    #: servers in one rack do (systemd-nspawn ``--network-zone``), instead of a link of its own
    lan: str | None = None
    #: CPUs the host may run on (``systemd-nspawn --cpu-affinity``, e.g. "1"), so that hosts on this
    #: machine do not share cores: llama.cpp's threads wait by spinning, and two servers on the
    #: same cores slow each other down many times over (33 s instead of 1.4 s for 4 streams)
    cpus: str | None = None
    #: an operator's host (``llamadeploy sandbox up``, the quickstart): it outlives the command that
    #: booted it, so only ``sandbox down`` (by name, or everything) stops it, never a reap of hosts
    #: whose owner is gone (which a test run does at its start)
    kept: bool = False
    #: the Debian release it runs (:data:`DISTROS`)
    distro: str = DEFAULT_DISTRO
    #: further ``systemd-nspawn`` options, as given: what a host needs beyond a plain server, such
    #: as a GPU machine's device nodes and driver (``--bind=/dev/nvidia0``, ``--bind-ro=...``)
    nspawn_options: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{lan_prefix(self.lan)}.{self.index}" if self.lan else f"{NET_PREFIX}.{self.index}.2"

    @property
    def gateway(self) -> str:
        return f"{lan_prefix(self.lan)}.1" if self.lan else f"{NET_PREFIX}.{self.index}.1"

    @property
    def network(self) -> str:
        """What NAT matches as this host's source (its own address on a LAN)."""
        return f"{self.address}/32" if self.lan else f"{NET_PREFIX}.{self.index}.0/30"

    @property
    def prefix_len(self) -> int:
        return 24 if self.lan else 30

    @property
    def veth(self) -> str:
        """This machine's end of the host's link (on a LAN: its port on the bridge)."""
        return f"vb-{self.name}"[:15] if self.lan else f"ve-{self.name}"[:15]

    @property
    def uplink(self) -> str:
        """The interface this machine reaches the host through: its veth, or the LAN's bridge.
        On a LAN, its transmit counter and qdisc are this machine's own traffic to the hosts."""
        return f"vz-{self.lan}"[:15] if self.lan else self.veth

    @property
    def root(self) -> Path:
        return HOSTS_DIR / self.name

    @property
    def known_hosts(self) -> Path:
        """This host's own key, as SSH clients check it: written at boot, removed at stop."""
        return KNOWN_HOSTS / self.address

    # -- lifecycle -----------------------------------------------------
    def boot(self, timeout: float = 60) -> SandboxHost:
        tree = ensure_rootfs(self.distro)
        key = ensure_ssh_key()
        reap(self.name)
        HOSTS_DIR.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)
        _run("cp", "-a", "--reflink=auto", str(tree), str(self.root), timeout=TREE_TIMEOUT)
        self._configure_tree(key)
        return self._start(timeout, log_mode="w")

    def reboot(self, timeout: float = 60) -> SandboxHost:
        """``systemctl reboot`` on the host, then bring it up again on the same tree.

        systemd-nspawn exits with status 133 when its container reboots (its
        ``systemd-nspawn@.service`` restarts it on that status); nothing supervises
        it here, so this starts it again, as a machine's firmware would. Files on
        the host survive; ``/run`` (tmpfs) and every process do not.
        """
        pid = self.pid
        assert pid, f"{self.name} is not booted"
        # a second from now, so this ssh returns before sshd goes down
        self.ssh("systemd-run -q --on-active=1 --timer-property=AccuracySec=10ms systemctl reboot")
        deadline = time.monotonic() + timeout
        status = None
        while status is None:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(raw)
            elif time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: still running {timeout}s after systemctl reboot")
            else:
                time.sleep(0.2)
        if status != 133:
            raise RuntimeError(f"{self.name}: systemd-nspawn exited {status} on reboot, not 133")
        _stop(self.name, None, self.veth, self.network, self.lan, self.index)  # its veth, NAT rules, state entry
        return self._start(timeout, log_mode="a")

    def _start(self, timeout: float, log_mode: str) -> SandboxHost:
        """Run systemd-nspawn on the prepared tree, wire its network, wait for SSH."""
        cmd = [
            "systemd-nspawn", "-q", "-D", str(self.root), "-M", self.name, "-b",
            "--register=no", "--keep-unit", *self._network_options(),
        ]
        for src, dst in self.binds.items():
            Path(src).mkdir(parents=True, exist_ok=True)
            cmd.append(f"--bind={src}:{dst}")
        for shared, dst in self.overlays.items():  # shared below, the host's own layer on top
            Path(shared).mkdir(parents=True, exist_ok=True)
            upper = _upper(self.name, shared)
            upper.mkdir(parents=True, exist_ok=True)
            cmd.append(f"--overlay={shared}:{upper}:{dst}")
        if self.cpus:
            cmd.append(f"--cpu-affinity={self.cpus}")
        if self.docker:
            cmd += [
                "--capability=all", "--system-call-filter=@keyring bpf",
                "--property=DeviceAllow=char-* rwm", "--bind=/sys/fs/cgroup",
            ]
        cmd += self.nspawn_options
        log = open(CACHE / f"{self.name}.console.log", log_mode)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.pid = proc.pid
        with _state() as state:
            # owner: the process that booted it; reap() leaves hosts alone whose owner still runs
            state[self.name] = {"pid": self.pid, "veth": self.veth, "network": self.network, "index": self.index,
                                "lan": self.lan, "owner": owner(), "overlays": self.overlays, "kept": self.kept,
                                "distro": self.distro}
        try:
            self._wire_network(proc, timeout)
            self.wait_ssh(timeout)
        except Exception:
            self.stop()
            raise
        return self

    def _network_options(self) -> list[str]:
        """The host's link: a veth of its own, or a port on its LAN's bridge."""
        return [f"--network-zone={self.lan}" if self.lan else "--network-veth"]

    def _configure_tree(self, key: Path) -> None:
        r = self.root
        (r / "etc/hostname").write_text(self.name + "\n")
        ssh = r / "root/.ssh"
        ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
        (ssh / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
        os.chmod(ssh / "authorized_keys", 0o600)
        # a host key of its own, as a real machine has (the base tree's would be shared by every
        # host), pinned for the clients: they check it strictly, and nothing warns of a missing one
        for old in (r / "etc/ssh").glob("ssh_host_*"):
            old.unlink()
        host_key = r / "etc/ssh/ssh_host_ed25519_key"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{self.name}", "-f", str(host_key))
        kind, blob = host_key.with_suffix(".pub").read_text().split()[:2]
        KNOWN_HOSTS.mkdir(parents=True, exist_ok=True)
        self.known_hosts.write_text(f"{self.address} {kind} {blob}\n")
        (r / "etc/systemd/network/10-host0.network").write_text(
            "[Match]\nName=host0\n\n[Network]\n"
            f"Address={self.address}/{self.prefix_len}\nGateway={self.gateway}\nLinkLocalAddressing=no\n"
        )
        # trust what this machine trusts (CI may reach PyPI through a TLS-inspecting proxy),
        # as a company host trusts its internal CA
        local_ca = Path("/usr/local/share/ca-certificates")
        if local_ca.is_dir():
            for crt in local_ca.glob("*.crt"):
                shutil.copy(crt, r / "usr/local/share/ca-certificates" / crt.name)
            shutil.copy("/etc/ssl/certs/ca-certificates.crt", r / "etc/ssl/certs/ca-certificates.crt")
        resolv = r / "etc/resolv.conf"
        if resolv.is_symlink() or resolv.exists():
            resolv.unlink()
        shutil.copy("/etc/resolv.conf", resolv)

    def _wire_network(self, proc: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not Path(f"/sys/class/net/{self.veth}").exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name}: systemd-nspawn exited early, see {CACHE}/{self.name}.console.log")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {self.veth} never appeared")
            time.sleep(0.2)
        if self.lan:  # the bridge exists once the first host of the zone is up
            while not Path(f"/sys/class/net/{self.uplink}").exists():
                time.sleep(0.1)
            _run("ip", "addr", "replace", f"{self.gateway}/24", "dev", self.uplink)
            _run("ip", "link", "set", self.uplink, "up")
        else:
            _run("ip", "addr", "add", f"{self.gateway}/30", "dev", self.veth)
            _run("ip", "link", "set", self.veth, "up")
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        for table, chain, *match in self._nat_rules():
            _run("iptables", *table, "-A", chain, *match)

    def _nat_rules(self) -> list[tuple[list[str], str, *tuple[str, ...]]]:
        """(table option, chain, match...) of each rule boot adds and stop removes."""
        return [
            (["-t", "nat"], "POSTROUTING", "-s", self.network, "!", "-o", self.uplink, "-j", "MASQUERADE"),
            ([], "FORWARD", "-i", self.uplink, "-s", self.network, "-j", "ACCEPT"),
            ([], "FORWARD", "-o", self.uplink, "-d", self.network, "-m", "state", "--state", "RELATED,ESTABLISHED",
             "-j", "ACCEPT"),
        ]

    def wait_ssh(self, timeout: float) -> None:
        """Until sshd accepts a login (after boot, or after a test reloaded it: a reload re-executes
        sshd, and a connection in that moment is refused)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.address, 22), timeout=1):
                    pass
                # a login that hangs (sshd still starting) is tried again, within the deadline
                if self.ssh("true", check=False, timeout=max(deadline - time.monotonic(), 1)).returncode == 0:
                    return
            except (OSError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name}: no SSH on {self.address} after {timeout}s")

    def stop(self) -> None:
        """Stop the host and undo everything boot() did. Safe to call twice."""
        _stop(self.name, self.pid, self.veth, self.network, self.lan, self.index)
        shutil.rmtree(self.root, ignore_errors=True)
        self.known_hosts.unlink(missing_ok=True)

    def power_cut(self, timeout: float = 30) -> None:
        """Kill the host at once, as pulling its power cord does: every process dies mid-write,
        nothing is shut down or synced by it; its files stay for :meth:`power_on`.

        systemd-nspawn's child is the host's PID 1; killing a PID namespace's init kills
        every process in it, and nspawn then exits.
        """
        pid = self.pid
        assert pid, f"{self.name} is not booted"
        for child in _run("ps", "--ppid", str(pid), "-o", "pid=").stdout.split():
            os.kill(int(child), signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: systemd-nspawn still running {timeout}s after its init was killed")
            time.sleep(0.1)
        _stop(self.name, None, self.veth, self.network, self.lan, self.index)
        self.pid = None

    def power_on(self, timeout: float = 60) -> SandboxHost:
        """Boot again on the files a :meth:`power_cut` left."""
        return self._start(timeout, log_mode="a")

    # -- access --------------------------------------------------------
    def ssh_args(self) -> list[str]:
        return [
            "ssh", "-i", str(SSH_KEY), "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=5", f"root@{self.address}",
        ]

    def ssh(self, command: str, check: bool = True, timeout: float = SSH_TIMEOUT) -> subprocess.CompletedProcess:
        """Run a command on the host; used by tests as a second channel, outside pyinfra.
        ``subprocess.TimeoutExpired`` when it has not ended after ``timeout`` s."""
        return _run(*self.ssh_args(), command, check=check, timeout=timeout)

    def inventory_entry(self) -> tuple[str, dict]:
        return (
            self.address,
            {
                "ssh_user": "root",
                "ssh_key": str(SSH_KEY),
                "ssh_known_hosts_file": str(self.known_hosts),
                "ssh_strict_host_key_checking": "yes",
            },
        )

    def testinfra_url(self) -> str:
        return f"ssh://root@{self.address}?ssh_identity_file={SSH_KEY}"

    def __enter__(self) -> SandboxHost:
        return self.boot()

    def __exit__(self, *exc) -> None:
        self.stop()


def _stop(name: str, pid: int | None, veth: str, network: str, lan: str | None = None,
          index: int | None = None, claimed: dict | None = None) -> None:
    """Stop a host and undo its network. ``claimed``: its state entry, already taken out of the
    state file by the caller (:func:`reap`); else this removes it, once the host is down."""
    # a host object that did not boot the host itself (a second script, an interrupted one) knows no
    # pid: the state file does, and without SIGTERM to systemd-nspawn the host would keep running
    pid = pid or _load_state().get(name, {}).get("pid")
    if pid:
        try:
            os.kill(pid, signal.SIGTERM)
            for _ in range(150):
                os.kill(pid, 0)
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                time.sleep(0.2)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _run("ip", "link", "del", veth, check=False)
    host = SandboxHost(name=name, index=index if index is not None else int(network.split(".")[2]), lan=lan)
    for table, chain, *match in host._nat_rules():
        while _run("iptables", *table, "-D", chain, *match, check=False).returncode == 0:
            pass
    info = claimed
    if info is None:
        with _state() as state:
            info = state.pop(name, {})
    if lan and not any(e.get("lan") == lan for e in _load_state().values()):
        # the last host of its LAN: the zone's bridge goes too. systemd-nspawn removes it when its
        # last container exits normally; one that was killed leaves it behind (seen: vz-trixie)
        _run("ip", "link", "del", host.uplink, check=False)
    _merge_back(name, info.get("overlays") or {})


def _merge_back(name: str, overlays: dict[str, str]) -> None:
    """What a host added to a shared directory it saw through an overlay (apt's downloaded
    .debs) goes into the shared one, each file by rename, so that later hosts find it."""
    for shared in overlays:
        for f in _listing(_upper(name, shared)):
            dest = Path(shared) / f.name
            if f.is_file() and f.suffix == ".deb" and not dest.exists():
                _merge_file(f, dest)
    shutil.rmtree(HOSTS_DIR / f"{name}.overlays", ignore_errors=True)


def _listing(directory: Path) -> list[Path]:
    """The files of ``directory``; none when it is gone (another process merged and removed it)."""
    try:
        return list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _merge_file(src: Path, dest: Path) -> None:
    """``src`` copied to ``dest`` by rename (readers never see half a file). Another process may
    merge at the same time (two test workers stopping hosts): a source that vanished is skipped,
    and a ``dest`` it placed first is replaced by the same file (apt names a .deb by its package,
    version and architecture)."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        tmp.replace(dest)
    except FileNotFoundError:
        tmp.unlink(missing_ok=True)


def _upper(name: str, shared: str) -> Path:
    """The host's own writable layer over ``shared``."""
    return HOSTS_DIR / f"{name}.overlays" / shared.strip("/").replace("/", "_") / "upper"


def reap(name: str | None = None, everything: bool = False) -> None:
    """Stop hosts left behind: one by name; else those whose owner (the process that booted
    them) is gone, and this process's own; with ``everything``, every host. Hosts of another
    running process (a parallel test worker) are left alone."""
    with _state() as state:  # decided and taken out at once: two workers never stop one host
        doomed = _claimed(state, name, everything, owner(), _alive)
    for n, info in doomed.items():
        _stop(n, info.get("pid"), info["veth"], info["network"], info.get("lan"), info.get("index"), claimed=info)
        shutil.rmtree(HOSTS_DIR / n, ignore_errors=True)


def _claimed(state: dict, name: str | None, everything: bool, me: int,
             alive: Callable[[int | None], bool]) -> dict[str, dict]:
    """The entries :func:`reap` stops, removed from ``state`` (the caller holds its lock)."""
    doomed = {}
    for n, info in list(state.items()):
        mine = not info.get("kept") and (info.get("owner") == me or not alive(info.get("owner")))
        if n == name or (name is None and (everything or mine)):
            doomed[n] = state.pop(n)
    return doomed


def ssh_config() -> Path:
    """Write (if needed) and return an ssh_config for the sandbox network (testinfra, plain ssh)."""
    key = ensure_ssh_key()
    text = (
        f"Host {NET_PREFIX}.* {LAN_PREFIX}.*\n  User root\n  IdentityFile {key}\n  StrictHostKeyChecking yes\n"
        f"  UserKnownHostsFile {KNOWN_HOSTS}/%h\n  LogLevel ERROR\n"
    )
    if not SSH_CONFIG.exists() or SSH_CONFIG.read_text() != text:
        SSH_CONFIG.write_text(text)
    return SSH_CONFIG


def running() -> dict[str, dict]:
    """Sandbox hosts that are up: name -> pid, veth, network."""
    return _load_state()
