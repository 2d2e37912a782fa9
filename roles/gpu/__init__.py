"""GPU role: reads a host's NVIDIA GPUs and CUDA toolkit (``facts.py``) and derives from them the
CUDA build settings and the offload to pin (:mod:`llamadeploy.gpu`).

The logic is pure and unit-tested on recorded ``nvidia-smi`` output; this role only gathers
the facts a deploy needs, so that a CPU host (no ``nvidia-smi``) reports no GPU and changes nothing.
"""
