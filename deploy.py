"""Deploy llama.cpp's llama-server: ``pyinfra inventory/<site>.py deploy.py``.

Reads like a table of contents: validate everything, build, model, service,
health gate. Each step is a role in ``roles/``; every setting lives in
``llamadeploy.config.HostConfig``.
"""

from pyinfra import host, inventory

from llamadeploy.config import validate_inventory
from roles.build import native_build
from roles.health import health_gate
from roles.model import expected_sha256, model_file
from roles.preflight import memory_plan
from roles.service import service

# 1. Validate the whole inventory before any host is touched (raises ConfigError).
cfg = validate_inventory(inventory)[host.name]

# 2. Preflight: model + KV cache must fit the memory limit (sizes context and slots).
plan = memory_plan(cfg)

# 3. The binary: build the pinned llama.cpp release (native mode).
binary = native_build(cfg)

# 4. The model: pushed once, verified by sha256, moved into place atomically.
model = model_file(cfg)

# 5. The service: user, key file, unit; restarted only when an input changed.
started, restarted = service(cfg, plan, model_sha256=expected_sha256(cfg), restart_on=[binary, model])

# 6. The gate: /health must answer 200 after any (re)start.
health_gate(cfg, after=[started, restarted])
