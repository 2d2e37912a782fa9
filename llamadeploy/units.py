"""Which systemd units on a host are the deploy's: it writes, stops and removes only those.

Most units the deploy writes have a name the operator picks (``llama_service.name``, checked with
the ownership record in roles/ownership). A few have fixed names that are not in the deploy's own
namespace: the RPC worker's ``ggml-rpc-server.service``, a CUDA host's
``llama-nvidia-devices.service``, and the fence guards ``<unit>-fence.service`` of HAProxy's
exporter, Prometheus, the node exporter and the RPC worker. An operator may have a unit of that
name already (a ``ggml-rpc-server`` they run by hand): a deploy that needs it is refused before
anything changes (:func:`refuse_foreign`), and a deploy or uninstall that removes such a unit
leaves one that is not the deploy's alone (:func:`left_alone`). Why: the deploy changes and removes only
what it created, as a Debian package removes only what it installed. A unit is the deploy's when
its file in ``/etc/systemd/system`` begins with the header every template of ours has.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping

from pyinfra import host
from pyinfra.api import DeployError, FactBase

#: where systemd finds unit files, the operator's directory first (systemd.unit(5)); the deploy
#: writes its units into the first
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/run/systemd/transient", "/run/systemd/generator.early",
             "/run/systemd/generator", "/run/systemd/generator.late", "/usr/local/lib/systemd/system",
             "/lib/systemd/system", "/usr/lib/systemd/system")
#: the first line of every unit the deploy writes (templates/*/*.service*)
UNIT_HEADER = "# Managed by llamadeploy"


def has_header(first_line: str) -> bool:
    """A unit or drop-in file whose first line is this is the deploy's (pure): every file it
    writes under ``/etc/systemd/system`` begins with :data:`UNIT_HEADER`. (:class:`UnitFiles`
    makes the same test in the host's shell, one command for every unit.)"""
    return first_line.startswith(UNIT_HEADER)


class UnitFiles(FactBase[dict[str, list[tuple[str, str]]]]):
    """For each unit name: the unit files of that name on the host, in systemd's search order
    (generated ones too: a SysV init script's), each with ``ours`` (a regular file whose first line
    is the deploy's header), ``file`` (any other regular file) or ``link`` (an alias or a mask);
    [] when systemd has no unit of that name."""

    def command(self, names: list[str]) -> str:
        dirs = " ".join(UNIT_DIRS)
        header = shlex.quote(UNIT_HEADER)
        return "; ".join(
            f"n={shlex.quote(n)}; for d in {dirs}; do f=\"$d/$n\"; "
            "if [ -L \"$f\" ]; then k=link; elif [ -f \"$f\" ]; then "
            f"case \"$(head -n 1 \"$f\")\" in {header}*) k=ours ;; *) k=file ;; esac; else continue; fi; "
            "printf '%s\\t%s\\t%s\\n' \"$n\" \"$f\" \"$k\"; done"
            for n in names
        ) + "; true"

    @staticmethod
    def default() -> dict[str, list[tuple[str, str]]]:
        return {}

    def process(self, output: list[str]) -> dict[str, list[tuple[str, str]]]:
        out: dict[str, list[tuple[str, str]]] = {}
        for line in output:
            name, path, kind = (line.split("\t") + ["", ""])[:3]
            if name and path:
                out.setdefault(name, []).append((path, kind.strip()))
        return out


def foreign(unit: str, found: list[tuple[str, str]], owned: frozenset[str] = frozenset()) -> list[str]:
    """The files of ``unit`` (``found``: its ``UnitFiles`` entry) that are not the deploy's (pure).

    The deploy's is a regular file in ``/etc/systemd/system`` whose first line is the header, or
    which an ownership record names (``unit NAME``: an edited header). A package's unit, a
    generated one, an alias link, a mask or an operator's own file is someone else's.
    """
    mine = f"{UNIT_DIRS[0]}/{unit}"
    return [path for path, kind in found
            if not (path == mine and (kind == "ours" or (kind == "file" and f"unit {unit}" in owned)))]


def refuse_foreign(wanted: Mapping[str, str], allowed: str) -> None:
    """Stop the run while pyinfra prepares when a unit this host's settings need (``wanted``:
    unit name -> the setting that asks for it) is already there and not the deploy's: it would be
    overwritten, restarted, and removed by an uninstall. ``allowed``: what the operator can do."""
    found = host.get_fact(UnitFiles, names=sorted(wanted))
    for unit in sorted(wanted):
        theirs = foreign(unit, found.get(unit, []))
        if theirs:
            raise DeployError(
                f"preflight refused host {host.name}: {wanted[unit]}: this host already has {theirs[0]}, a unit this "
                f"deploy did not create (it would overwrite, restart and on uninstall remove it); allowed: {allowed}")


def left_alone(unit: str) -> bool:
    """Whether the host has a unit of this name that is not the deploy's: then nothing stops,
    disables or removes it (a no-op says so). False for the deploy's own unit and for none."""
    theirs = foreign(unit, host.get_fact(UnitFiles, names=[unit]).get(unit, []))
    if theirs:
        host.noop(f"{theirs[0]} is not the deploy's (its first line is not {UNIT_HEADER!r}): left alone")
    return bool(theirs)
