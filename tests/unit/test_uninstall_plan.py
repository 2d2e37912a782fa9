"""What on a Docker engine the deploy installed is someone else's, and what the purge of a
package the deploy installed leaves behind (roles/uninstall/plan.py)."""

from __future__ import annotations

import pytest

from llamadeploy.packages import accounts_text
from llamadeploy.roles import front, monitor
from llamadeploy.roles.uninstall.plan import foreign_engine_objects, leftovers

PROJECT = "/opt/llama-server-compose"
OURS = {"llamadeploy/llama-server:b11434"}


def test_an_engine_with_only_this_services_project_and_images_holds_nothing_foreign():
    listing = [f"container llama-server-compose_llama-server_1 {PROJECT}", "image llamadeploy/llama-server:b11434",
               "image <none>:<none>"]
    assert foreign_engine_objects(listing, PROJECT + "/", OURS) == []


def test_an_operators_container_image_or_volume_is_foreign():
    listing = [f"container llama-server-compose_llama-server_1 {PROJECT}", "container their-db ",
               "container other-llm_1 /opt/other-llm-compose", "image postgres:16",
               "image llamadeploy/llama-server:b11434", "volume pgdata"]
    assert foreign_engine_objects(listing, PROJECT, OURS) == [
        "container their-db", "container other-llm_1", "image postgres:16", "volume pgdata"]


def test_an_image_the_host_had_before_the_deploy_is_foreign():
    """No deploy brought it (no ``image REF`` in the record): the engine keeps it, and stays."""
    assert foreign_engine_objects(["image llamadeploy/llama-server:b11434"], PROJECT, set()) == [
        "image llamadeploy/llama-server:b11434"]


def test_no_docker_command_lists_nothing():
    assert foreign_engine_objects([], PROJECT, OURS) == []


@pytest.mark.parametrize(("purged", "before", "paths", "accounts"), [
    # a front's host the deploy made: HAProxy's chroot and the node exporter's account go
    (["haproxy", "socat", "prometheus-node-exporter"], ["user root", "group root"], ("/var/lib/haproxy",),
     ("prometheus",)),
    # the host had the account before the first deploy: it stays
    (["prometheus", "prometheus-alertmanager"], ["user root", "user prometheus", "group prometheus"], (), ()),
    # no record of the accounts before (a host deployed before it existed): no account is ours
    (["prometheus"], None, (), ()),
    # packages that leave nothing, and packages not purged
    (["cmake", "build-essential"], [], (), ()),
    ([], [], (), ()),
])
def test_leftovers_of_purged_packages(purged, before, paths, accounts):
    left = leftovers(purged, before)
    assert (left.paths, left.accounts) == (paths, accounts)


def test_the_files_the_deploy_added_beside_a_packages_own_go_with_it_then_its_directory():
    """The front's PEM with HAProxy, the monitor's targets, rules and keys with Prometheus and
    Alertmanager, then their directory where it is empty; a host without those packages (an
    operator's file of that name) keeps them."""
    left = leftovers(["haproxy", "prometheus", "prometheus-alertmanager"], ["user root"])
    assert set(left.files) == {front.PEM, *monitor.PROMETHEUS_FILES, *monitor.ALERTMANAGER_FILES}
    assert left.dirs_if_empty == ("/etc/haproxy", "/etc/prometheus")
    assert set(leftovers(["prometheus-alertmanager"], []).files) == set(monitor.ALERTMANAGER_FILES)
    assert leftovers(["prometheus-node-exporter"], []).files == ()


def test_accounts_record_names_users_and_groups():
    assert accounts_text({"root": {}, "llama": {}}, ["root", "docker"]) == \
        "user llama\nuser root\ngroup docker\ngroup root\n"
    lines = accounts_text({"prometheus": {}}, ["prometheus"]).splitlines()
    assert leftovers(["prometheus"], lines).accounts == ()  # what the record holds is read back as the host's
