"""The package records a deploy writes (llamadeploy.packages), without a host: pyinfra's facts
and operations are replaced, so the record each call would write can be read back."""

from __future__ import annotations

import weakref
from io import StringIO
from typing import Any

import pytest
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import FileContents
from pyinfra.facts.server import Groups, Users

from llamadeploy import packages
from llamadeploy.config import HostConfig


class FakeHost:
    """A host on its first deploy: curl installed, no record yet, root its only account."""

    name = "10.0.0.5"

    class State:
        """One pyinfra run."""

    def __init__(self) -> None:
        self.state = self.State()

    def get_fact(self, fact: type, **kwargs: Any) -> Any:
        return {DebPackages: {"curl": ["8.5.0"]}, FileContents: None, Users: {"root": {}}, Groups: ["root"]}[fact]


@pytest.fixture
def written(monkeypatch) -> dict[str, str]:
    """dest -> the text the run's last put there would write."""
    out: dict[str, str] = {}

    class Put:
        @staticmethod
        def put(name: str, src: StringIO, dest: str, **kwargs: Any) -> None:
            out[dest] = src.getvalue()

    class Quiet:
        def __getattr__(self, name: str) -> Any:
            return lambda *args, **kwargs: None

    monkeypatch.setattr(packages, "host", FakeHost())
    monkeypatch.setattr(packages, "_RECORDED", weakref.WeakKeyDictionary())
    monkeypatch.setattr(packages, "atomic", Put)
    monkeypatch.setattr(packages, "files", Quiet())
    monkeypatch.setattr(packages, "apt", Quiet())
    return out


def test_two_installs_of_one_role_in_one_run_record_both(written):
    """A monitor's first deploy with Alertmanager installs Prometheus and then Alertmanager, both
    for the role ``monitor``: the record the run leaves names both (each call reads the record as
    the run found it; the second one wrote over the first, and Prometheus was never purged)."""
    cfg = HostConfig.model_validate({"role": "monitor"})
    packages.installed(cfg, "monitor", name="Prometheus", packages=["prometheus", "curl"])
    packages.installed(cfg, "monitor", name="Alertmanager", packages=["prometheus-alertmanager"])
    assert written[packages.record_path(cfg, "monitor")].split() == ["prometheus", "prometheus-alertmanager"]
    # the host's own packages and accounts, as the run found them
    assert written[f"{cfg.service.cache_dir}/{packages.BEFORE}"] == "curl\n"
    assert written[f"{cfg.service.cache_dir}/{packages.ACCOUNTS_BEFORE}"] == "user root\ngroup root\n"


def test_a_package_installed_from_a_file_is_recorded_with_the_role_s_others(written):
    """cuda-keyring comes from a .deb (``apt.deb``): recorded before it, and kept when the role's
    packages are recorded in the same run."""
    cfg = HostConfig.model_validate({"role": "front"})  # any role: the record is per role name
    packages.recording(cfg, "gpu", ["cuda-keyring"])
    packages.installed(cfg, "gpu", name="NVIDIA", packages=["cuda-toolkit-12-8"])
    assert written[packages.record_path(cfg, "gpu")].split() == ["cuda-keyring", "cuda-toolkit-12-8"]


def test_a_new_run_starts_from_the_record_it_finds(written, monkeypatch):
    """What one run recorded is not carried into the next: each starts from the host's record."""
    cfg = HostConfig.model_validate({"role": "monitor"})
    packages.installed(cfg, "monitor", name="Prometheus", packages=["prometheus"])
    monkeypatch.setattr(packages, "host", FakeHost())  # the next run, whose host found no record
    packages.installed(cfg, "monitor", name="Alertmanager", packages=["prometheus-alertmanager"])
    assert written[packages.record_path(cfg, "monitor")].split() == ["prometheus-alertmanager"]


def test_no_accounts_record_from_a_listing_without_root(written, monkeypatch):
    """An empty or failed listing of the accounts would make every package's account look like
    the deploy's at uninstall: no record then (uninstall removes no account without one)."""
    host = FakeHost()
    monkeypatch.setattr(host, "get_fact", lambda fact, **kw: {} if fact is Users else FakeHost().get_fact(fact))
    monkeypatch.setattr(packages, "host", host)
    packages.installed(HostConfig.model_validate({"role": "monitor"}), "monitor", name="P", packages=["prometheus"])
    assert not [d for d in written if d.endswith(packages.ACCOUNTS_BEFORE)]
