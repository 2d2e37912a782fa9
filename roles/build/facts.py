"""What the build role reads from a host: the CPU feature flags a ``GGML_NATIVE`` build depends on."""

from __future__ import annotations

from pyinfra.api import FactBase


class CpuFlagsDigest(FactBase[str]):
    """A short digest of the CPU's feature flags (``/proc/cpuinfo``), "" when unknown.

    ``GGML_NATIVE`` compiles for the builder's instruction set (``-march=native``): a
    binary built on an AVX-512 host dies with SIGILL on one without. Hosts whose flags
    digest differs never share a native build.
    """

    def command(self) -> str:
        return "grep -m1 -E '^(flags|Features)' /proc/cpuinfo | tr ' ' '\\n' | sort | tr '\\n' ' ' | sha256sum | cut -c1-12"

    def process(self, output: list[str]) -> str:
        return output[0].strip() if output else ""
