"""The transfer role's operations: seed push, peers serving, peers pulling, peers stopped.

Every participating host runs the same operations in the same order; pyinfra runs each
on all hosts before the next, so a round's servers are up before its pulls start, and a
round's pulls are finished (and their hosts counted as holders) before the next round is
planned. Who does what is decided when the operation *executes* (from the shared
:class:`~llamadeploy.roles.transfer.fleet.Fleet`), not when it is prepared: a host that
failed or whose pull did not complete is simply not a source in the next round.
"""

from __future__ import annotations

import posixpath
import shlex
import time
from typing import IO, Any, cast

from pyinfra import host, logger
from pyinfra.api import FunctionCommand, StringCommand, operation
from pyinfra.api.command import PyinfraCommand
from pyinfra.api.util import format_exception
from pyinfra.facts.systemd import SystemdStatus

from llamadeploy import atomic
from llamadeploy.artifacts import ProgressReader
from llamadeploy.roles.transfer.fleet import UNIT_GLOB, Fleet, fleet_for


def _planning(what: str) -> bool:
    """Operations are also run while pyinfra prepares; the plan exists only once they execute."""
    if not host.state.is_executing:
        host.noop(f"{what}: decided when the transfer runs")
        return True
    return False


@operation()
def seeded(key: str):
    """
    The controller's one push of a fan-out: to the first host that needs the file, when no host
    of the run holds it yet (sha256-verified on the host before it lands).

    + key: the shipment (``Fleet.key``)
    """
    if _planning("seed"):
        return
    fleet = fleet_for(host.inventory, key)
    if fleet.seed() != host.name:
        host.noop("not the seed of this fan-out")
        return
    member = fleet.members[host.name]
    sha = fleet.sha256()
    q = shlex.quote
    tmp = f"{member.dest}.partial"
    yield FunctionCommand(fleet.push_started, (), {})
    yield f"mkdir -p {q(posixpath.dirname(member.dest))} && rm -f {q(tmp)} {q(tmp)}.aria2"
    yield atomic.StagedUpload(cast(IO[Any], ProgressReader(fleet.controller_path, f"{host.name} {fleet.label}")),
                              tmp, local_path=fleet.controller_path)
    yield atomic.install_if_hash_matches(tmp, member.dest, sha, member.mode, what=member.dest)
    yield FunctionCommand(fleet.pushed_to, (host.name,), {})


@operation()
def peers_serving(key: str, round_no: int):
    """
    This host serves its verified copy for round ``round_no`` when the round pulls from it.

    + key: the shipment
    + round_no: 1, 2, ... (the seed push is round 0)

    busybox httpd, bound to the host's fleet address only, run as a transient unit with a
    dynamic user that stops by itself after ``llama_transfer.timeout``; before it starts,
    nftables (table ``inet llamadeploy_peer``) drops the port for every address that is not
    a host of this run; a transient guard loads it again whenever it goes, the server is bound
    to the guard, and the table goes when they stop. The file is served under its
    sha256 from a directory of links to verified copies, nothing else.
    """
    if _planning(f"round {round_no}: serve"):
        return
    fleet = fleet_for(host.inventory, key)
    if host.name not in fleet.sources(round_no):
        host.noop(f"round {round_no}: no host pulls from this one")
        return
    fleet.served.add(host.name)
    yield PeerServe(fleet, round_no)


class PeerShell(PyinfraCommand):
    """A fan-out command whose failure does not fail the host: the direct push that follows every
    fan-out still delivers. Only a host that stops answering fails, as any failed command does;
    the controller times the command and the subclass says what success and failure mean."""

    def __init__(self, fleet: Fleet, round_no: int):
        super().__init__()
        self.fleet, self.round_no = fleet, round_no

    def shell(self, name: str) -> str:
        raise NotImplementedError

    def succeeded(self, name: str, took: float) -> None:
        raise NotImplementedError

    def failed(self, name: str, why: str, took: float) -> str:
        """The warning for a command that failed on a host that still answers."""
        raise NotImplementedError

    def execute(self, state: Any, host: Any, connector_arguments: Any) -> bool:
        t0 = time.monotonic()
        try:
            ok, output = host.run_shell_command(StringCommand(self.shell(host.name)), print_output=False,
                                                print_input=False, **connector_arguments)
        except Exception as exc:  # noqa: BLE001 - the connection died with the host: fail it, not the run
            host.log_styled(f"{self.fleet.label}: {host.name} does not answer any more ({format_exception(exc)}); "
                            "a next run resumes its partial file", fg="red", log_func=logger.error)
            return False
        took = time.monotonic() - t0
        if ok:
            self.succeeded(host.name, took)
        else:
            why = " ".join(output.stderr_lines[-3:] or output.stdout_lines[-3:]) or "no output"
            host.log_styled(self.failed(host.name, why, took), fg="yellow", log_func=logger.warning)
        return True


class PeerServe(PeerShell):
    """The serve command; one that fails (port taken, address not on the host) leaves the host no
    source this round: its receivers pull from the others or get the push."""

    def __repr__(self) -> str:
        return f"PeerServe({self.fleet.label}, round {self.round_no})"

    def spec_json(self) -> list[Any]:
        from pyinfra import host

        return ["peer_serve", self.round_no, self.shell(host.name)]

    def shell(self, name: str) -> str:
        return self.fleet.serve_command(name)

    def succeeded(self, name: str, took: float) -> None:
        self.fleet.serving.setdefault(self.round_no, set()).add(name)

    def failed(self, name: str, why: str, took: float) -> str:
        return (f"{self.fleet.label}: {name} cannot serve in round {self.round_no} ({why}); "
                "its receivers use the other peers or the controller's push")


class PeerPull(PeerShell):
    """aria2c on the host, pulling ranges from the round's sources into ``dest.partial``; a pull
    that fails (every source gone, a hash mismatch) says so, and the direct push delivers."""

    def __init__(self, fleet: Fleet, round_no: int, sources: list[str]):
        super().__init__(fleet, round_no)
        self.sources = sources

    def __repr__(self) -> str:
        return f"PeerPull({self.fleet.label}, round {self.round_no}, from {', '.join(self.sources)})"

    def spec_json(self) -> list[Any]:
        """What the operation specs compare: the sources and the shell command the host runs."""
        from pyinfra import host

        return ["peer_pull", self.sources, self.shell(host.name)]

    def shell(self, name: str) -> str:
        return self.fleet.pull_command(name, self.sources)

    def succeeded(self, name: str, took: float) -> None:
        self.fleet.received(name, self.fleet.size(), took, ", ".join(self.sources))

    def failed(self, name: str, why: str, took: float) -> str:
        return (f"{self.fleet.label}: pull from peers {', '.join(self.sources)} failed after {took:.1f}s "
                f"({why}); the controller pushes it now")


@operation()
def peer_pulled(key: str, round_no: int):
    """
    This host pulls the file from its round's sources, verifies its sha256, renames it into place.

    + key: the shipment
    + round_no: 1, 2, ...

    aria2c writes ``dest.partial`` (and its ``.aria2`` control file, so an interrupted pull
    resumes where it stopped); only a file whose sha256 matches is renamed onto ``dest``.
    """
    if _planning(f"round {round_no}: pull"):
        return
    fleet = fleet_for(host.inventory, key)
    if not fleet.plan(round_no).get(host.name):
        host.noop(f"round {round_no}: nothing to pull")
        return
    sources = fleet.live_sources(round_no, host.name)
    if not sources:
        host.noop(f"round {round_no}: none of its peers serves; the controller pushes it")
        return
    yield PeerPull(fleet, round_no, sources)


@operation()
def peers_stopped(key: str):
    """
    No peer server left on this host: stopped (its nftables table goes with it) once the
    fan-out is over, including one a killed earlier run left behind.

    + key: the shipment
    """
    if _planning("stop serving"):
        return
    fleet = fleet_for(host.inventory, key)
    if host.name == fleet.last_member():
        fleet.report()
    running = any((host.get_fact(SystemdStatus, services=UNIT_GLOB) or {}).values())
    if host.name not in fleet.served and not running:
        host.noop("no peer server here")
        return
    yield StringCommand(fleet.stop_command(host.name))
