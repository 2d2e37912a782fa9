"""The uninstall role's operations: remove trees and recorded packages, nothing else."""

from __future__ import annotations

import shlex
from collections.abc import Generator
from typing import Any

from pyinfra import host
from pyinfra.api import FactBase, operation
from pyinfra.facts.files import Directory, File, FileContents
from pyinfra.facts.server import Groups, Users

from llamadeploy.packages import ACCOUNTS_BEFORE, BEFORE, RECORD_PREFIX, RECORDING_ROLES, recorded
from llamadeploy.roles.uninstall.plan import leftovers


class LeftToRemove(FactBase[tuple[bool, str | None]]):
    """For a directory: whether a mount point lies below it, and the first entry under it that is
    ours to remove (on its filesystem, neither a mount point nor a directory holding one).

    After a removal that had to stop at a bind-mounted cache this is ``(True, None)``: nothing
    left to do, so a second uninstall reports no change.
    """

    def command(self, path: str, keep: str | None = None) -> str:
        q = shlex.quote
        kept = f'case "$f" in {q(keep)}|{q(keep)}/*) continue;; esac; ' if keep else ""
        # mount points below path (mountinfo field 5); find would walk into a bind mount of the same
        # filesystem, so entries in or above a mount point are skipped by name
        return (
            f"mps=$(awk -v p={q(path)} '$5 == p || index($5, p \"/\") == 1 {{print $5}}' /proc/self/mountinfo); "
            '[ -n "$mps" ] && echo mounted; '
            f"find {q(path)} -mindepth 1 2>/dev/null | while IFS= read -r f; do {kept}keep=; "
            'for m in $mps; do case "$f" in "$m"|"$m"/*) keep=1;; esac; case "$m" in "$f"/*) keep=1;; esac; done; '
            '[ -n "$keep" ] || { echo "left $f"; break; }; done'
        )

    @staticmethod
    def default() -> tuple[bool, str | None]:
        """No output at all (no mount point, nothing left): pyinfra gives a fact's default then."""
        return False, None

    def process(self, output: list[str]) -> tuple[bool, str | None]:
        left = next((line[5:] for line in output if line.startswith("left ")), None)
        return "mounted" in output, left


@operation()
def tree_removed(path: str, keep: str | None = None) -> Generator[Any, None, None]:
    """
    Remove ``path`` and everything under it on its own filesystem, optionally keeping one child.

    + path: the directory to remove
    + keep: a child of ``path`` to keep (the models, with ``keep_models``)

    A mount point below ``path`` (a bind-mounted cache, an NFS model share) stays, with what is
    in it and the directories that hold it: ``--one-file-system`` alone would still empty a bind
    mount of the same filesystem, so then only what lies outside every mount point is removed.
    """
    if not host.get_fact(Directory, path=path):
        host.noop(f"{path} is not there")
        return
    mounted, left = host.get_fact(LeftToRemove, path=path, keep=keep)
    if keep and left is None:
        host.noop(f"only {keep} is left under {path}")
        return
    if mounted and left is None:
        host.noop(f"only mount points are left under {path}")
        return
    q = shlex.quote
    if keep or mounted:
        # rm -rf --one-file-system still empties a bind mount of the same filesystem (same device):
        # remove only what is neither a mount point (or the kept child), inside one, nor above one
        yield (f"mps=$(awk -v p={q(path)} '$5 == p || index($5, p \"/\") == 1 {{print $5}}' /proc/self/mountinfo); "
               + (f"mps=\"$mps {q(keep)}\"; " if keep else "")
               + f"find {q(path)} -mindepth 1 2>/dev/null | while IFS= read -r f; do skip=; "
               'for m in $mps; do case "$f" in "$m"|"$m"/*) skip=1;; esac; case "$m" in "$f"/*) skip=1;; esac; done; '
               '[ -n "$skip" ] || rm -rf --one-file-system -- "$f"; done; true')
        return
    # rm fails when it had to leave a mount point behind: that is success here, anything else is not
    # --preserve-root=all: an argument that is itself a mount point is refused, not emptied
    yield (f"rm -rf --one-file-system --preserve-root=all {q(path)} 2>/dev/null || "
           f"{{ test -e {q(path)} && awk -v p={q(path)} '$5 == p || index($5, p \"/\") == 1 {{f=1}} END {{exit !f}}' "
           "/proc/self/mountinfo; }")


def recorded_packages(cache_dir: str, kept_roles: tuple[str, ...] = ()) -> set[str]:
    """Every package the records in ``cache_dir`` say the deploy installed, but ``kept_roles``'."""
    names: set[str] = set()
    for role in RECORDING_ROLES:
        if role not in kept_roles:
            names |= set(recorded(host.get_fact(FileContents, path=f"{cache_dir}/{RECORD_PREFIX}{role}")))
    return names


@operation()
def packages_purged(cache_dir: str, kept_roles: tuple[str, ...] = ()) -> Generator[Any, None, None]:
    """
    Purge the packages the deploy recorded as installed by it, then their unused dependencies.

    + cache_dir: where the ``installed-packages.<role>`` records are
    + kept_roles: roles whose packages stay (a Docker engine that holds an operator's containers)
    """
    names = recorded_packages(cache_dir, kept_roles)
    if not names:
        host.noop("no packages were installed by the deploy")
        return
    pkgs = " ".join(shlex.quote(n) for n in sorted(names))
    before = shlex.quote(f"{cache_dir}/{BEFORE}")
    apt = "DEBIAN_FRONTEND=noninteractive apt-get -y -qq"
    # refuse when purging ours would take a package someone installed by hand (one depending on curl)
    yield (
        "byhand=$(apt-mark showmanual); "
        f"manual=$(apt-get -s purge {pkgs} | awk '/^Purg |^Remv /{{print $2}}' | sed 's/:.*//' | "
        f"grep -vxF -e {' -e '.join(shlex.quote(n) for n in sorted(names))} | "
        'while read -r p; do printf \'%s\\n\' "$byhand" | grep -qxF -- "$p" && echo "$p"; done; true); '
        'if [ -n "$manual" ]; then echo "not purging: it would also remove packages installed by hand:" $manual >&2; '
        "exit 1; fi"
    )
    yield f"{apt} purge {pkgs}"
    # what apt pulled in with them and nothing needs now, not even as a mere suggestion (apt suggests
    # dpkg-dev, which would keep the whole toolchain), and that was not on the host before
    yield (
        "extra=$(apt-get -s -o APT::AutoRemove::SuggestsImportant=false autoremove | "
        f"awk '/^Remv /{{print $2}}' | grep -vxF -f {before} || true); "
        f'if [ -n "$extra" ]; then {apt} purge $extra; fi'
    )


#: where a Docker engine keeps its images, containers and state, which its purge leaves behind
ENGINE_STATE = ("/var/lib/docker", "/var/lib/containerd")


@operation()
def engine_state_removed() -> Generator[Any, None, None]:
    """
    Remove the state of a Docker engine the deploy installed and has just purged.

    Called only where nothing on that engine was anyone else's (roles/uninstall/plan.py):
    Debian's purge keeps ``/var/lib/docker`` and ``/var/lib/containerd`` (GBs of images), the key
    dockerd wrote and the group, which no one uses once the engine is gone.
    """
    q = shlex.quote
    commands = [f"rm -rf --one-file-system -- {q(d)}" for d in ENGINE_STATE if host.get_fact(Directory, path=d)]
    if host.get_fact(File, path="/etc/docker/key.json"):
        commands.append("rm -f /etc/docker/key.json && rmdir /etc/docker 2>/dev/null || true")
    if host.get_fact(Directory, path="/etc/cni"):
        commands.append("rmdir /etc/cni/net.d /etc/cni 2>/dev/null || true")
    if "docker" in host.get_fact(Groups):
        commands.append("groupdel docker")
    if not commands:
        host.noop("the Docker engine left no state")
        return
    yield from commands


#: where the account check looks for files still the account's; an engine's layers (the images'
#: own files, with their own uids) are not the host's
ACCOUNT_SEARCH = "find /etc /var /opt /srv /home -xdev \\( -path /var/lib/docker -o -path /var/lib/containerd \\) -prune -o"


@operation()
def package_leftovers_removed(cache_dir: str, kept_roles: tuple[str, ...] = ()) -> Generator[Any, None, None]:
    """
    Remove what the purge of the packages the deploy installed left (roles/uninstall/plan.py).

    + cache_dir: where the package records and the record of the accounts before are
    + kept_roles: roles whose packages stayed (as in :func:`packages_purged`)

    The files the deploy added beside a package's own, the package's directory once they are gone
    (where nothing else is in it), its service's state, and the account its postinst created.
    An account or a group goes only where the host did not have it before the first deploy, no
    process runs as it and no file under /etc, /var, /opt, /srv or /home (an engine's layers
    aside) is still its user's or its group's: another package's, an operator's.
    """
    left = leftovers(recorded_packages(cache_dir, kept_roles),
                     host.get_fact(FileContents, path=f"{cache_dir}/{ACCOUNTS_BEFORE}"))
    q = shlex.quote
    commands = [f"rm -f -- {q(f)}" for f in left.files if host.get_fact(File, path=f)]
    commands += [f"[ ! -d {q(d)} ] || rmdir --ignore-fail-on-non-empty -- {q(d)}"
                 for d in left.dirs_if_empty if host.get_fact(Directory, path=d)]
    commands += [f"rm -rf --one-file-system -- {q(p)}" for p in left.paths if host.get_fact(Directory, path=p)]
    users, groups = host.get_fact(Users) or {}, host.get_fact(Groups) or []
    for name in left.accounts:
        if name not in users and name not in groups:
            continue
        n = q(name)
        in_use = (f"pgrep -u {n} >/dev/null || [ -n \"$({ACCOUNT_SEARCH} \\( -user {n} -o -group {n} \\) -print -quit "
                  "2>/dev/null)\" ]" if name in users else
                  f"[ -n \"$({ACCOUNT_SEARCH} -group {n} -print -quit 2>/dev/null)\" ]")
        remove = (f"userdel {n}; getent group {n} >/dev/null && groupdel {n} || true" if name in users
                  else f"groupdel {n} || echo {q(f'the group {name} stays: an account has it as its group')}")
        commands.append(f"if {in_use}; then echo {q(f'the account {name} stays: it still owns something')}; "
                        f"else {remove}; fi")
    if not commands:
        host.noop("the purged packages left nothing")
        return
    yield from commands
