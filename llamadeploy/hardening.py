"""The systemd sandbox that llama.cpp's code runs in on a host: the server's unit, and
``llama-fit-params`` when the deploy pins a GPU host's offload.

Both read the same third-party input, a GGUF file, with the same parser; so both run as the
service's user under the same restrictions. One list of directives serves the unit template
(``templates/service/llama-server.service.j2``) and :func:`sandboxed_run`, so that the two cannot
drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

#: directives a side run does not get: it shares its user with the running server, whose IPC
#: objects are not the side run's to remove when it ends
_NOT_FOR_A_SIDE_RUN = ("RemoveIPC=",)
#: seconds a side run may take before systemd stops it (a fit reads metadata and sizes buffers:
#: seconds; a pathological model must not hold the deploy, or a server stopped for the fit, forever)
SIDE_RUN_MAX_SEC = 600


def hardening(device_allow: Sequence[str] | None, numa: bool = False) -> list[str]:
    """The unit's hardening directives, comments included, in the unit's order (pure).

    ``device_allow``: None on a CPU host (``PrivateDevices``); on a CUDA host the ``DeviceAllow=``
    lines of its NVIDIA devices (``gpu.device_allow``), behind a closed device policy.
    ``numa``: the server pins threads and memory (``--numa``), so those calls are allowed back."""
    devices = (["PrivateDevices=yes"] if device_allow is None else
               ["# the NVIDIA devices and nothing else (PrivateDevices would hide them)", "DevicePolicy=closed",
                *device_allow])
    return [
        "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
        "# /run/lock, a world-writable tmpfs of its own, stayed writable under ProtectSystem=strict",
        "# (systemd 252, measured); the host's deploy lock lives there",
        "ReadOnlyPaths=-/run/lock", *devices,
        "ProtectKernelTunables=yes", "ProtectKernelModules=yes", "ProtectKernelLogs=yes", "ProtectControlGroups=yes",
        "ProtectClock=yes", "ProtectHostname=yes", "ProtectProc=invisible", "RestrictNamespaces=yes",
        "RestrictRealtime=yes", "RestrictSUIDSGID=yes", "LockPersonality=yes", "RemoveIPC=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service", "SystemCallFilter=~@privileged @resources",
        *(["# --numa pins threads and memory to nodes: allow exactly those calls back out of @resources",
           "SystemCallFilter=sched_setaffinity sched_getaffinity set_mempolicy get_mempolicy mbind migrate_pages"]
          if numa else []),
        "# a filtered call fails with EPERM instead of killing the server with SIGSYS",
        "SystemCallErrorNumber=EPERM",
    ]


def sandboxed_run(user: str, device_allow: Sequence[str] | None, limits: Mapping[str, str] | None = None) -> list[str]:
    """The ``systemd-run`` words that run a command as ``user`` under the unit's hardening and
    resource ``limits`` (``tuning.unit_limits``), with no capabilities, the unit's umask and at most
    :data:`SIDE_RUN_MAX_SEC`, and wait for it, its output on this command's (pure).

    ``--wait`` makes systemd-run's exit status the command's; ``--collect`` leaves no failed
    transient unit behind."""
    props = [line for line in hardening(device_allow) if not line.startswith(("#", *_NOT_FOR_A_SIDE_RUN))]
    props += [f"{k}={v}" for k, v in (limits or {}).items()]
    props += ["CapabilityBoundingSet=", "UMask=0077", f"RuntimeMaxSec={SIDE_RUN_MAX_SEC}"]
    return ["systemd-run", "--quiet", "--wait", "--pipe", "--collect", "--service-type=exec", f"--uid={user}",
            f"--gid={user}", *(w for p in props for w in ("-p", p))]
