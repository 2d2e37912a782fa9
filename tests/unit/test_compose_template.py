"""The compose file renders to valid Compose (checked against the compose specification schema).

``data/compose_spec-docker-compose-1.29.2.json`` is the schema docker-compose 1.29.2
(Debian bookworm's) validates with, copied from its PyPI wheel.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from llamadeploy.config import HostConfig
from llamadeploy.render import render as render_template
from llamadeploy.tuning import compose_resources

SCHEMA = json.loads((Path(__file__).parent / "data/compose_spec-docker-compose-1.29.2.json").read_text())
VALIDATOR = jsonschema.Draft201909Validator(SCHEMA)


def render(cfg: HostConfig, **over) -> dict:
    vars = dict(
        service="llama-server", image="ghcr.io/ggml-org/llama.cpp:server-b11434", args=["--host", "0.0.0.0", "--port", "8080", "--alias", "a b"],
        bind_host=cfg.server.host, port=cfg.server.port, model_dir="/var/lib/llama-server/models",
        api_key_file="/etc/llama-server/docker-api-key", resources=compose_resources(cfg),
        container_port=8080, models_in_container="/models",
        log_max_size=cfg.docker.log_max_size, log_max_files=cfg.docker.log_max_files,
        model_file="m.gguf", model_sha256="a" * 64, preset_mount=None,
    )
    vars.update(over)
    text = render_template("docker/docker-compose.yml.j2", **vars)
    return yaml.safe_load(text)


def cfg(**sections) -> HostConfig:
    sections["server"] = {"allow_unauthenticated": True, **sections.get("server", {})}  # tests of the open case
    return HostConfig.model_validate({"model": {"path": "/m.gguf"}, **sections})


def test_user_example_limits_and_schema():
    doc = render(cfg(limits={"cpus": 4.0, "memory": "8G", "cpus_reserved": 2.0, "memory_reserved": "4G"}))
    VALIDATOR.validate(doc)
    svc = doc["services"]["llama-server"]
    assert svc["deploy"]["resources"] == {"limits": {"cpus": "4", "memory": "8G"},
                                          "reservations": {"cpus": "2", "memory": "4G"}}
    assert svc["command"][-1] == "a b"
    assert svc["ports"] == ["0.0.0.0:8080:8080"]
    assert svc["volumes"] == ["/var/lib/llama-server/models:/models:ro"]
    assert svc["secrets"] == ["api_key"] and doc["secrets"]["api_key"]["file"] == "/etc/llama-server/docker-api-key"
    assert svc["healthcheck"]["test"][:3] == ["CMD", "curl", "-fsS"]
    assert svc["logging"]["options"] == {"max-size": "50m", "max-file": "3"}
    assert svc["user"] == "65534:65534" and svc["read_only"] is True and svc["cap_drop"] == ["ALL"]


def test_no_key_no_limits_still_valid():
    doc = render(cfg(), api_key_file=None)
    VALIDATOR.validate(doc)
    assert "secrets" not in doc and "deploy" not in doc["services"]["llama-server"]


def test_schema_rejects_what_compose_would():
    doc = render(cfg(limits={"cpus": 4.0}))
    doc["services"]["llama-server"]["deploy"]["resources"]["limits"]["gpus"] = 1
    try:
        VALIDATOR.validate(doc)
    except jsonschema.ValidationError:
        return
    raise AssertionError("schema accepted an unknown key")


def test_gpu_reserves_nvidia_devices_and_cuda_image():
    c = cfg(build={"backend": "cuda"})
    assert cfg(mode="docker", server={"gpu_layers": 99}).docker_image.endswith("server-cuda-b11434")
    doc = render(c)
    VALIDATOR.validate(doc)
    devices = doc["services"]["llama-server"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert c.docker_image == "ghcr.io/ggml-org/llama.cpp:server-cuda-b11434"
    assert cfg().docker_image == "ghcr.io/ggml-org/llama.cpp:server-b11434"


def test_router_mode_mounts_the_presets_directory_read_only():
    """Router mode in a container: the preset's host directory at the path its command line names,
    read-only, beside the models; valid for docker-compose 1.29's schema."""
    doc = render(cfg(), args=["--host", "0.0.0.0", "--port", "8080", "--models-preset", "/etc/llama-router/models.ini"],
                 preset_mount=("/etc/llama-server/router", "/etc/llama-router"))
    VALIDATOR.validate(doc)
    assert doc["services"]["llama-server"]["volumes"] == ["/var/lib/llama-server/models:/models:ro",
                                                          "/etc/llama-server/router:/etc/llama-router:ro"]


@pytest.mark.parametrize(("host", "port"), [("0.0.0.0", 8080), ("10.0.0.5", 9001), ("::", 8081)])
def test_the_port_preflight_reads_the_port_the_compose_file_publishes(host, port):
    """The port preflight counts a docker-proxy as the deploy's only on a port its compose file
    publishes (roles/preflight): read from the rendered file, not the container's own port or the
    health check's URL."""
    from llamadeploy.roles.preflight import compose_publishes

    c = cfg(server={"host": host, "port": port})
    text = render_template("docker/docker-compose.yml.j2", **{
        **dict(service="llama-server", image="i:1", args=[], bind_host=host, port=port, model_dir="/m",
               api_key_file=None, resources=compose_resources(c), container_port=8080, models_in_container="/models",
               log_max_size="50M", log_max_files=3, model_file="m.gguf", model_sha256="a" * 64, preset_mount=None)})
    assert compose_publishes(text.splitlines()) == {port}
    assert compose_publishes(None) == set()
