"""Deploy llama.cpp's llama-server: ``pyinfra inventory/<site>.py deploy.py``.

Reads like a table of contents. Steps 1-3 run on the controller while pyinfra
prepares the run, so a bad setting, an unreachable model or a host that is too
small stops everything before any host changes. Each step is a role in
``roles/``; every setting lives in ``llamadeploy.config.HostConfig``.
"""

from pyinfra import host, inventory

from llamadeploy.config import validate_inventory
from roles import docker
from roles import model as model_role
from roles.build import native_build
from roles.health import health_gate
from roles.preflight import memory_plan
from roles.service import service

# 1. Validate the whole inventory before any host is touched (raises ConfigError).
cfg = validate_inventory(inventory)[host.name]

# 2. The model: resolve it (Hub: pinned commit + LFS sha256); controller mode downloads
#    and verifies it once here; the host's free disk is checked.
art, on_host = model_role.prepare(cfg)

# 3. Preflight: weights + KV cache must fit the memory limit (sizes context and slots).
plan = memory_plan(cfg, art)

if cfg.mode == "native":
    # 4. The binary: build the pinned llama.cpp release.
    runtime = [native_build(cfg)]
else:
    # 4. The engine and the image (pushed tarball for air-gapped hosts, or a pinned pull).
    docker.engine(cfg)
    runtime = docker.image(cfg)

# 5. The model on the host: sent or downloaded once, verified by sha256, renamed into place.
model = model_role.model_files(cfg, art, on_host)

# 6. The service, restarted only when an input changed; the other mode's server is
#    stopped first so the port is never held twice.
if cfg.mode == "native":
    docker.stop_compose(cfg)
    started, restarted = service(cfg, plan, art, model_role.model_path(cfg, art), restart_on=[*runtime, *model])
else:
    docker.stop_native(cfg)
    started, restarted = docker.compose_service(cfg, plan, art, restart_on=[*runtime, *model])

# 7. The gate: /health must answer 200 after any (re)start.
health_gate(cfg, after=[started, restarted])
