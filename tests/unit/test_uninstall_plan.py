"""What on a Docker engine the deploy installed is someone else's (roles/uninstall/plan.py)."""

from __future__ import annotations

from llamadeploy.roles.uninstall.plan import foreign_engine_objects

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
