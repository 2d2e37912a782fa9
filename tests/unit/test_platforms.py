"""Which operating systems a deploy accepts, read from recorded ``/etc/os-release`` files.

debian-12 and debian-13 are copies of the sandbox's debootstrap trees (bookworm, trixie);
the others are those distributions' published files. pyinfra's own LinuxDistribution fact
parses them, as it does on a host.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pyinfra.facts.server import LinuxDistribution

from llamadeploy.roles.build.artifact import host_kind
from llamadeploy.roles.preflight import platform_problem

RELEASES = Path(__file__).parent / "data" / "os-release"


def fact(name: str) -> dict:
    """LinuxDistribution as a host with this os-release reports it."""
    text = (RELEASES / name).read_text()
    return dict(LinuxDistribution().process(["/etc/os-release", *text.splitlines(), "---"]))


@pytest.mark.parametrize("name, major", [("debian-12", 12), ("debian-13", 13)])
def test_tested_debian_releases_pass(name: str, major: int) -> None:
    distro = fact(name)
    assert (distro["name"], distro["major"]) == ("Debian", major)
    assert platform_problem(distro) is None


@pytest.mark.parametrize("name, shown", [
    ("ubuntu-24.04", "Ubuntu 24.04.1 LTS"),
    ("rocky-9", "Rocky Linux 9.4 (Blue Onyx)"),
    ("debian-forky", "Debian GNU/Linux forky/sid"),  # testing: no VERSION_ID, so no release to check
])
def test_other_systems_are_refused_by_name(name: str, shown: str) -> None:
    problem = platform_problem(fact(name))
    assert problem is not None
    assert f"operating system = {shown!r}" in problem
    assert "allowed: Debian 12 (bookworm) or Debian 13 (trixie)" in problem


def test_unknown_system_is_refused() -> None:
    assert "operating system = 'an unknown system'" in (platform_problem(LinuxDistribution.default()) or "")


def test_bookworm_and_trixie_never_share_a_release() -> None:
    """Build once keys a shipped release by kind: a trixie host never receives bookworm's binary."""
    kinds = {host_kind(fact(n), "x86_64", "ab12", native=False) for n in ("debian-12", "debian-13")}
    assert kinds == {"debian12-x86_64-portable", "debian13-x86_64-portable"}


@pytest.mark.parametrize("name, expected", [
    ("debian-12", ["docker.io", "docker-compose"]),
    ("debian-13", ["docker.io", "docker-cli", "docker-compose"]),  # trixie's docker.io has no `docker`
])
def test_docker_engine_packages_per_release(name: str, expected: list[str]) -> None:
    from llamadeploy.roles.docker import distro_engine_packages

    assert distro_engine_packages(fact(name)["major"]) == expected


def test_a_mixed_fleet_builds_once_per_distribution(monkeypatch) -> None:
    """Two bookworm and two trixie hosts of one release key in one run: exactly one builder per
    distribution (each kind's first host without the release), and no host builds for the
    other kind; every host of a kind is told the same builder."""
    from llamadeploy.config import HostConfig
    from llamadeploy.roles import build

    bookworm, trixie = "debian12-x86_64-abc", "debian13-x86_64-abc"
    have_release = {"b1"}  # b1 has bookworm's release already: b2 builds it

    class FakeHost:
        def __init__(self, name: str) -> None:
            self.name = name

        def get_fact(self, _fact, path: str) -> bool:
            assert path.endswith("/bin/llama-server")
            return self.name in have_release

    hosts = [FakeHost(n) for n in ("b1", "t1", "b2", "t2")]

    class FakeInventory:  # hashable, as pyinfra's is (the builders are kept per inventory)
        def __iter__(self):
            return iter(hosts)

        def get_active_hosts(self) -> list[FakeHost]:
            return list(hosts)

    inventory = FakeInventory()
    cfg = HostConfig.model_validate({"model": {"path": "/m.gguf"}, "server": {"allow_unauthenticated": True}})
    kinds = {"b1": bookworm, "b2": bookworm, "t1": trixie, "t2": trixie}
    monkeypatch.setattr(build, "validate_inventory", lambda inv: {h.name: cfg for h in inv})
    monkeypatch.setattr(build, "kind_of", lambda h, _cfg: kinds[h.name])
    told = {}
    for h in hosts:  # each host asks while pyinfra prepares its operations
        monkeypatch.setattr(build, "host", type("Current", (), {"inventory": inventory, "name": h.name})())
        told[h.name] = build.builder_for(cfg, kinds[h.name])
    assert told == {"b1": "b2", "b2": "b2", "t1": "t1", "t2": "t1"}
