"""The single source of every setting a host can have.

This module is the schema only. Settings come from pyinfra inventory data under
keys named ``llama_<section>`` (``llama_mode``, ``llama_build``, ``llama_model``,
``llama_server``, ``llama_limits``, ``llama_service``, ``llama_docker``,
``llama_health``); :mod:`llamadeploy.hostdata` reads and deep-merges those
layers and validates every host of an inventory against :class:`HostConfig`
before any operation runs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import posixpath
import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    IPvAnyNetwork,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

#: Data keys on a pyinfra host that belong to us.
PREFIX = "llama_"

SIZE_RE = re.compile(r"^[0-9]+[KMGT]?$")
Size = Annotated[str, Field(pattern=SIZE_RE.pattern, description="bytes, or a number with K/M/G/T")]
#: places a host path may not be: what the unit hides or protects (PrivateTmp, ProtectHome,
#: ProtectKernel*, PrivateDevices), the kernel's own trees, and root's home
FORBIDDEN_ROOTS = ("/tmp", "/var/tmp", "/home", "/root", "/proc", "/sys", "/dev", "/run", "/var/run", "/boot")
#: directories a service path may be inside but never be: uninstall removes the service's paths
SYSTEM_DIRS = frozenset({
    "/bin", "/sbin", "/lib", "/lib64", "/usr", "/etc", "/opt", "/srv", "/var", "/mnt", "/media",
    "/usr/bin", "/usr/sbin", "/usr/lib", "/usr/lib64", "/usr/libexec", "/usr/share", "/usr/include",
    "/usr/src", "/usr/local", "/usr/local/bin", "/usr/local/lib", "/usr/local/share", "/var/lib",
    "/var/cache", "/var/log", "/var/spool", "/var/opt", "/var/mail", "/var/backups", "/var/local",
    "/etc/systemd", "/etc/default", "/etc/apt",
})
#: characters a host path or file name may hold: nothing a shell or systemd reads specially
PATH_CHARS = r"[A-Za-z0-9._+@/-]"


def _host_path(value: str) -> str:
    """An absolute, normalized host path of plain characters, outside the hidden or protected trees."""
    if not re.fullmatch(rf"/{PATH_CHARS}*", value):
        raise ValueError("must be an absolute path of letters, digits and ._+@/- only")
    if posixpath.normpath(value) != value:
        raise ValueError(f"must be normalized (no '..', '.', '//' or trailing '/'; e.g. {posixpath.normpath(value)!r})")
    if value == "/" or value in SYSTEM_DIRS:
        raise ValueError(f"must be a directory of the service's own, not {value} itself (e.g. {value}/llama)")
    for root in FORBIDDEN_ROOTS:
        if value == root or value.startswith(root + "/"):
            raise ValueError(
                f"must not be under {root} (hidden or protected for the service; allowed e.g. /opt, /srv, /var/lib, /etc)"
            )
    return value


def relative_path(value: str) -> str:
    """A relative path inside a tree (tarball subdir, Hub file name): no '..', no leading '/' or '-'."""
    if not re.fullmatch(rf"{PATH_CHARS}+", value) or value.startswith(("/", "-")):
        raise ValueError("must be a relative path of letters, digits and ._+@/- not starting with / or -")
    parts = value.split("/")
    if ".." in parts or "" in parts:
        raise ValueError("must stay inside its tree (no '..' or empty parts)")
    return value


def _printable(value: str) -> str:
    """No control characters: a newline, CR or NUL would start a new line in a file or log."""
    if not re.fullmatch(r"[^\x00-\x1f\x7f]{1,4096}", value):
        raise ValueError("holds a control character (newline, CR, NUL...) or is empty; allowed: printable text")
    return value


def _ip_address(value: str) -> str:
    """An address to listen on; nothing else reaches a ``--host`` flag or a ``bind`` line."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError("must be an IP address to bind, e.g. 0.0.0.0 or 127.0.0.1") from None
    return value


AbsPath = Annotated[str, AfterValidator(_host_path)]
BindAddress = Annotated[str, AfterValidator(_ip_address)]
RelPath = Annotated[str, AfterValidator(relative_path)]
Name = Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")]
#: a git ref or commit: what git and CMake get, never an option
Ref = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$")]
#: a CMake -D value: no quotes, spaces, $, backticks; ';' only as CMake's list separator
CMakeValue = Annotated[str, Field(pattern=r"^[A-Za-z0-9._+:/=,;@ -]{0,256}$")]
#: a git remote: https://, ssh:// or git@host:path, never something git reads as an option
GitUrl = Annotated[str, Field(pattern=r"^(https?://|ssh://|file:///|git@)[A-Za-z0-9._~:/@+-]+$")]


#: a controller path: anything but control characters (a newline would split a line it is logged on)
ControllerPath = Annotated[str, AfterValidator(_printable)]
#: a model file name as it reaches the unit, compose file and manifest (also from a Hub listing)
FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@-]{0,199}")

#: llama-server flags the schema owns -> the setting to use instead. In ``extra_args`` they would
#: bypass a policy (bind, key, firewall), a plan (memory, slots, offload) or what the release records
OWNED_FLAGS: dict[str, str] = {
    **dict.fromkeys(["--host"], "llama_server.host"),
    **dict.fromkeys(["--port"], "llama_server.port"),
    **dict.fromkeys(["--api-key", "--api-key-file"], "llama_server.api_key_file"),
    **dict.fromkeys(["-hft", "--hf-token"], "llama_model.hf_token_file"),
    **dict.fromkeys(["-m", "--model", "-mu", "--model-url", "-dr", "--docker-repo", "-hf", "-hfr", "--hf-repo",
                     "-hff", "--hf-file"], "llama_model"),
    **dict.fromkeys(["-a", "--alias"], "llama_model.alias"),
    **dict.fromkeys(["--rpc"], "llama_rpc.workers_group"),
    **dict.fromkeys(["-ngl", "--gpu-layers", "--n-gpu-layers", "-fit", "--fit", "-fitt", "--fit-target",
                     "-fitc", "--fit-ctx"], "llama_server.gpu_layers"),
    **dict.fromkeys(["--ssl-key-file", "--ssl-cert-file"], "llama_front.tls_pem (TLS ends at the front)"),
    **dict.fromkeys(["--slot-save-path", "--log-file", "--log-prompts-dir"],
                    "nothing: the hardened unit writes no files (logs go to the journal)"),
    **dict.fromkeys(["--models-dir", "--models-preset", "--models-max", "--models-autoload", "--no-models-autoload"],
                    "llama_models and llama_router (router mode)"),
    **dict.fromkeys(["--sleep-idle-seconds"], "llama_router.sleep_idle_seconds"),
    **dict.fromkeys(["--embedding", "--embeddings", "--rerank", "--reranking", "--pooling"],
                    "llama_models[].kind and llama_models[].pooling (router mode)"),
    **dict.fromkeys(["-t", "--threads"], "llama_server.threads"),
    **dict.fromkeys(["-tb", "--threads-batch"], "llama_server.threads_batch"),
    **dict.fromkeys(["-c", "--ctx-size"], "llama_server.ctx_size"),
    **dict.fromkeys(["-np", "--parallel"], "llama_server.parallel"),
    **dict.fromkeys(["-cram", "--cache-ram"], "llama_server.cache_ram"),
    **dict.fromkeys(["--chat-template", "--chat-template-file", "--jinja", "--no-jinja"], "llama_server.chat_template"),
    **dict.fromkeys(["--numa"], "llama_server.numa"),
    **dict.fromkeys(["-lm", "--load-mode"], "llama_server.load_mode"),
    **dict.fromkeys(["-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified"], "llama_server.kv_unified"),
    **dict.fromkeys(["-cb", "--cont-batching", "-nocb", "--no-cont-batching"], "llama_server.cont_batching"),
    **dict.fromkeys(["--metrics"], "llama_server.metrics"),
    **dict.fromkeys(["--repack", "-nr", "--no-repack"], "llama_server.repack"),
    **dict.fromkeys(["--swa-full"], "llama_server.swa_full"),
}

#: llama-server flags no setting offers, because they open what the deploy keeps closed -> why.
#: In ``extra_args`` they would hand every client that holds the key a shell or the host's files,
#: fetch unpinned files, or move the API off the paths the gate, the fronts and Prometheus call.
DENIED_FLAGS: dict[str, str] = {
    **dict.fromkeys(["--tools", "--tools-runtime", "-ag", "--agent", "--mcp-servers-config", "--mcp-servers-json",
                     "--ui-mcp-proxy", "--webui-mcp-proxy"],
                    "gives every client tools that run commands, read and write files or reach other hosts as "
                    "the service's account (llama-server: 'do not enable in untrusted environments')"),
    **dict.fromkeys(["--path", "--media-path"], "serves or reads the host's files for clients"),
    **dict.fromkeys(["--props"], "lets any client change the server's settings (POST /props)"),
    **dict.fromkeys(["-mmu", "--mmproj-url", "--spec-draft-hf", "-hfd", "-hfrd", "--hf-repo-draft"],
                    "downloads a file at start that no sha256 pins (give a local file: --mmproj FILE, "
                    "--model-draft FILE)"),
    **dict.fromkeys(["--reuse-port"], "lets another process bind the same port, which preflight refuses"),
    **dict.fromkeys(["--api-prefix"], "moves the API off the paths the gate, the fronts and Prometheus call"),
}
#: llama-server's model presets (``--gpt-oss-20b-default``, ``--fim-qwen-7b-spec``, ...; releases add
#: more): each sets a Hub repository to download at start, which no sha256 pins, and the port, the
#: context, the slots and the chat template, which the deploy sets (common/arg.cpp). Not
#: ``--spec-default``, which only turns on n-gram speculative decoding.
PRESET_FLAG = re.compile(r"--[a-z0-9.-]+-(default|spec)")
PRESET_ALLOWED = frozenset({"--spec-default"})


def parse_size(size: str) -> int:
    """Bytes of a :data:`Size` (``"8G"`` is 8 GiB)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)


def problem(field: str, value: object, message: str) -> PydanticCustomError:
    """A cross-field error that still names one field and its value (``section.field``).

    pydantic reports a model validator's error at the model's location; this keeps the
    operator's message as specific as a field error: host, field, value, what is allowed.
    """
    return PydanticCustomError("field_problem", message, {"field": field, "value": value})


class Section(BaseModel):
    """Strict base: unknown keys and wrong types are errors, never ignored."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class BuildConfig(Section):
    """How llama.cpp is fetched and compiled on the host (native mode)."""

    #: llama.cpp release tag (``b<number>``)
    version: Annotated[str, Field(pattern=r"^b[0-9]+$")] = "b11434"
    #: commit hash or name recorded in ``llama-server --version``; defaults to the version
    commit: Ref | None = None
    #: ``git`` (clone the tag) or ``tarball`` (push a controller file: air-gapped hosts)
    source: Literal["git", "tarball"] = "git"
    #: repository for ``source: git``
    git_url: GitUrl = "https://github.com/ggml-org/llama.cpp.git"
    #: controller path of a source tarball (air-gapped hosts, CI)
    tarball: ControllerPath | None = None
    #: directory inside the tarball that holds llama.cpp's top CMakeLists.txt
    tarball_subdir: RelPath = "."
    #: GGML_NATIVE: tune for the build host's CPU; turn off for portable builds
    native: bool = True
    #: ``none`` or ``openblas``
    blas: Literal["none", "openblas"] = "none"
    #: extra ``-D`` options, e.g. ``{"GGML_AVX512": "OFF"}``
    cmake_args: dict[str, CMakeValue] = {}
    #: compile through ccache (``/var/cache/llama.cpp/ccache``)
    ccache: bool = True
    #: build once per kind of host (distribution + version, CPU architecture, and with
    #: ``native`` the CPU's feature flags): the first host of a kind compiles, the release
    #: comes back to the controller's cache as a tarball with its sha256, and every other
    #: host of that kind gets it pushed and verified instead of compiling. False: every
    #: host compiles for itself
    build_once: bool = True
    #: parallel compile jobs; ``None`` means all CPUs of the host
    jobs: Annotated[int, Field(ge=1, le=1024)] | None = None
    #: "cuda": build with ``GGML_CUDA=ON`` for the host's NVIDIA GPUs (needs a driver and nvcc on
    #: the builder, see ``llama_gpu``); CPU and CUDA builds are separate releases
    backend: Literal["cpu", "cuda"] = "cpu"
    #: ``CMAKE_CUDA_ARCHITECTURES`` ("89", "80;89"); default: the compute capabilities of the GPUs the
    #: builder reports (8.9 -> 89), never llama.cpp's PTX-heavy default list or ``native``
    cuda_architectures: Annotated[str, Field(pattern=r"^[0-9]{2,3}(;[0-9]{2,3})*$")] | None = None

    @model_validator(mode="after")
    def _tarball_needs_path(self) -> BuildConfig:
        if self.source == "tarball" and not self.tarball:
            raise ValueError("source 'tarball' needs llama_build.tarball (a controller path)")
        return self

    @field_validator("cmake_args")
    @classmethod
    def _cmake_keys(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
                raise ValueError(f"cmake option {key!r} must be an upper-case CMake variable name")
        return v

    def cmake_options(self) -> dict[str, str]:
        """All -D options, in a stable order; they are part of the release key."""
        opts = {
            "CMAKE_BUILD_TYPE": "Release",
            "BUILD_SHARED_LIBS": "OFF",
            "GGML_NATIVE": "ON" if self.native else "OFF",
            "LLAMA_BUILD_TESTS": "OFF",
            "LLAMA_BUILD_EXAMPLES": "OFF",
            "LLAMA_CURL": "OFF",
            "LLAMA_OPENSSL": "OFF",
            "LLAMA_BUILD_NUMBER": self.version[1:],
            "LLAMA_BUILD_COMMIT": self.commit or self.version,
            # the RPC backend in every release: any server can be an RPC head, and its workers'
            # ggml-rpc-server comes from the same release (it does nothing unless --rpc is given)
            "GGML_RPC": "ON",
        }
        if self.blas == "openblas":
            opts |= {"GGML_BLAS": "ON", "GGML_BLAS_VENDOR": "OpenBLAS"}
        if self.backend == "cuda":
            # the architectures the host's GPUs need join at build time (gpu.cuda_cmake_args) and key
            # the build-once artifact through the host kind; explicit ones are part of the release key
            opts["GGML_CUDA"] = "ON"
            if self.cuda_architectures:
                opts["CMAKE_CUDA_ARCHITECTURES"] = self.cuda_architectures
        return opts | dict(sorted(self.cmake_args.items()))

    def release_key(self) -> str:
        """Directory name of a release: version plus a hash of what shaped the binary.

        Two hosts with the same key run the same build, so later a fleet can build
        once and ship the artifact (the key is the cache key).
        """
        digest = hashlib.sha256(json.dumps(self.cmake_options(), sort_keys=True).encode()).hexdigest()
        return f"{self.version}-{digest[:12]}"


class ModelConfig(Section):
    """The GGUF file served: from the catalog, a Hugging Face repo, or a controller file.

    Exactly one of ``catalog``, ``repo_id`` and ``path``; none means the catalog's
    tiny default. Hub models are pinned: ``revision`` is resolved to a commit
    hash, and every file is checked against the repo's LFS sha256 (or ``sha256``).
    """

    #: short name from llamadeploy/catalog.py (see README "Models")
    catalog: str | None = None
    #: Hugging Face repo, e.g. "Qwen/Qwen2.5-3B-Instruct-GGUF"
    repo_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")] | None = None
    #: file in the repo; a split GGUF is named by its first part (*-00001-of-0000N.gguf)
    filename: RelPath | None = None
    #: instead of filename: a quantization such as "Q4_K_M", matched against the repo's .gguf files
    quant: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+$")] | None = None
    #: branch, tag or commit; recorded as the commit hash it resolves to
    revision: Ref = "main"
    #: controller path of a .gguf file (no Hub involved)
    path: ControllerPath | None = None
    #: expected sha256 of the (single) file; default: the Hub's LFS sha256 / the controller file's
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    #: name shown by /v1/models and accepted as "model" in requests
    alias: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")] | None = None
    #: controller: download once on the controller, push to hosts; host: each host downloads
    distribution: Literal["controller", "host"] = "controller"
    #: Hub endpoint (an on-prem mirror); default: the controller's HF_ENDPOINT or huggingface.co
    hf_endpoint: Annotated[str, Field(pattern=r"^https?://[A-Za-z0-9._~:/@%+-]+$")] | None = None
    #: controller file holding a Hub token (gated repos); default: HF_TOKEN / huggingface_hub's login
    hf_token_file: ControllerPath | None = None

    @field_validator("path")
    @classmethod
    def _gguf(cls, v: str | None) -> str | None:
        if v is not None and not v.endswith(".gguf"):
            raise ValueError("must be a .gguf file")
        if v is not None and not FILE_NAME_RE.fullmatch(posixpath.basename(v)):
            raise ValueError("its file name (it reaches the unit) must be letters, digits and ._+@- only")
        return v

    @field_validator("catalog")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        from llamadeploy.catalog import CATALOG

        if v is not None and v not in CATALOG:
            raise ValueError(f"unknown catalog model (known: {', '.join(CATALOG)})")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        sources = [k for k in ("catalog", "repo_id", "path") if getattr(self, k) is not None]
        if len(sources) > 1:
            raise ValueError(f"give one of catalog, repo_id, path (got {', '.join(sources)})")
        if self.repo_id is not None and (self.filename is None) == (self.quant is None):
            raise ValueError("with repo_id give exactly one of filename, quant")
        if self.path is not None and self.distribution == "host":
            raise ValueError("distribution 'host' needs a Hub model (catalog or repo_id), not a controller path")
        return self

    @property
    def source(self) -> str:
        return "path" if self.path else "hub"

    def hub_target(self) -> tuple[str, str | None, str | None]:
        """(repo_id, filename, quant) for a Hub model, the catalog's default included."""
        from llamadeploy.catalog import CATALOG, DEFAULT_MODEL

        if self.repo_id:
            return self.repo_id, self.filename, self.quant
        entry = CATALOG[self.catalog or DEFAULT_MODEL]
        return entry.repo_id, entry.filename, None


#: a router-mode model's name: its preset section and the request's "model" (a ':' would be read as
#: a tag and rewritten by the router, a '/' is a path in ``/models``)
ROUTER_ALIAS = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class RouterModel(ModelConfig):
    """One model of a host that serves several (``llama_models``, router mode).

    Its source fields are :class:`ModelConfig`'s, pinned and verified the same way; the rest are
    the options of its own llama-server instance, rendered into the router's preset INI. Unset
    context and slots are sized from the model and the memory limit as in one-model mode, then
    every set of models that can be resident at once must fit together (``roles/router/plan.py``).
    """

    #: the name requests give as "model"; required (it names the preset section)
    alias: Annotated[str, Field(pattern=ROUTER_ALIAS)]
    #: chat: /v1/chat/completions; embedding: /v1/embeddings; rerank: /v1/rerank
    kind: Literal["chat", "embedding", "rerank"] = "chat"
    #: startup: loaded when the server starts; on_demand: at its first request (and unloaded by
    #: the router's LRU when ``llama_router.models_max`` are loaded)
    load: Literal["startup", "on_demand"] = "startup"
    #: seconds the router waits for the instance to stop before it kills it
    stop_timeout: Annotated[int, Field(ge=1, le=3600)] = 10
    ctx_size: Annotated[int, Field(ge=256, le=1048576)] | None = None
    parallel: Annotated[int, Field(ge=1, le=256)] | None = None
    #: embedding pooling; a reranker's is "rank"; default: the model's own
    pooling: Literal["none", "mean", "cls", "last", "rank"] | None = None
    chat_template: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")] | None = None
    #: speculative decoding without a draft model (n-gram lookup in the context), chat models only
    spec_type: Literal["ngram-simple", "ngram-map-k", "ngram-mod", "ngram-cache"] | None = None

    @model_validator(mode="after")
    def _kind_options(self) -> RouterModel:
        if self.kind == "rerank" and self.pooling != "rank":
            raise ValueError(f"model {self.alias!r}: a reranker needs pooling 'rank' (got {self.pooling!r})")
        if self.kind != "rerank" and self.pooling == "rank":
            raise ValueError(f"model {self.alias!r}: pooling 'rank' is a reranker's; set kind 'rerank'")
        if self.kind == "chat" and self.pooling is not None:
            raise ValueError(f"model {self.alias!r}: pooling is for embedding and rerank models, not chat")
        for name in ("chat_template", "spec_type"):
            if self.kind != "chat" and getattr(self, name) is not None:
                raise ValueError(f"model {self.alias!r}: {name} is for chat models, not {self.kind}")
        return self


class RouterConfig(Section):
    """The one llama-server of a router-mode host (``llama_models``): how many models it holds."""

    #: the most models loaded at once (0: no limit); the memory check sizes for this many
    models_max: Annotated[int, Field(ge=0, le=64)] = 4
    #: put a model to sleep after this many idle seconds: its weights are freed, its process stays, and
    #: its next request wakes it (the router says ``sleeping``); None: never
    sleep_idle_seconds: Annotated[int, Field(ge=1, le=7 * 86400)] | None = None


class ServerConfig(Section):
    """llama-server flags. ``None`` means: computed from host facts (see tuning)."""

    #: address to bind
    host: BindAddress = "0.0.0.0"
    #: port
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    #: generation threads; default: physical cores of the host
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    #: prompt-processing threads; default: logical CPUs of the host
    threads_batch: Annotated[int, Field(ge=1, le=1024)] | None = None
    #: total context (tokens) shared by all slots; default: sized to the memory limit
    ctx_size: Annotated[int, Field(ge=256, le=1048576)] | None = None
    #: parallel request slots; default 8, fewer if memory is short (llama-server's auto is 4)
    parallel: Annotated[int, Field(ge=1, le=256)] | None = None
    #: share one KV cache between slots (``--kv-unified``)
    kv_unified: bool = True
    #: layers offloaded to a GPU; 0: none on a CPU build, llama.cpp's fit (pinned at deploy) on a
    #: CUDA build (``llama_build.backend``); a number > 0 is used as given
    gpu_layers: Annotated[int, Field(ge=0, le=999)] = 0
    #: full-size KV cache for sliding-window layers (``--swa-full``); default: on for models
    #: with a sliding window (Gemma 2/3). Without it llama-server cannot roll such a cache
    #: back to a shared prefix and re-evaluates every prompt from its first token, so a chat
    #: that resends its history pays for all of it on every turn. The memory plan already
    #: sizes every layer's cache at full length, so turning it on never breaks the plan.
    swa_full: bool | None = None
    #: continuous batching (on in llama-server by default)
    cont_batching: bool = True
    #: ``--load-mode`` (replaced --mlock/--no-mmap); default: computed, "mmap+mlock" where the
    #: plan leaves the host half its RAM and LimitMEMLOCK allows it, else llama-server's auto
    load_mode: Literal["auto", "none", "mmap", "mlock", "mmap+mlock"] | None = None
    #: weight repacking into CPU-specific layouts, AMX included (``--repack``/``--no-repack``);
    #: default: on, except on CPUs with AMX, where b11434's AMX kernels crashed the server
    #: (SIGSEGV in ggml_backend_amx_mul_mat on the first batch, seen on this project's CI VMs)
    repack: bool | None = None
    #: NUMA policy: auto = "distribute" on hosts with several NUMA nodes, nothing otherwise
    numa: Literal["auto", "off", "distribute", "isolate", "numactl"] = "auto"
    #: Prometheus ``/metrics``
    metrics: bool = True
    #: host-RAM prompt cache in MiB (``--cache-ram``; 0 = off); default: what the memory limit
    #: leaves after weights, KV cache and overhead, at most llama-server's own 8192. Unsized, the
    #: cache grows with every distinct prompt up to that default (benchmarks/SOAK.md: RSS +29.3 %
    #: in a 10-minute soak), which the memory plan would not have counted
    cache_ram: Annotated[int, Field(ge=0, le=1048576)] | None = None
    #: llama-server built-in chat template (``--no-jinja --chat-template NAME``); default: the
    #: GGUF's own template, or, when the GGUF has none, the built-in for its architecture
    #: (without one llama-server falls back to ChatML, whose markers a Gemma vocabulary lacks)
    chat_template: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")] | None = None
    #: bearer key for /v1/* and /metrics; stored 0600 on the host, never on a command line
    api_key: SecretStr | None = None
    #: controller file holding the key (mode 0600; ``llamadeploy key new FILE`` writes one);
    #: read at validation, so every host that names the file gets its key
    api_key_file: ControllerPath | None = None
    #: serve /v1 and /metrics on a non-loopback address without a key (refused unless true)
    allow_unauthenticated: bool = False
    #: networks (CIDRs) that may reach the port; others are dropped by our own nftables table
    #: (native mode); the host itself always may. None = no firewall rules
    allow_from: list[IPvAnyNetwork] | None = None
    #: extra arguments appended verbatim (escape hatch); never a key (use api_key_file), a flag a
    #: setting owns, or one that opens what the deploy keeps closed (--tools, --path, --reuse-port...:
    #: docs/security.md)
    extra_args: list[str] = []


    @field_validator("extra_args")
    @classmethod
    def _not_owned(cls, v: list[str]) -> list[str]:
        """Printable values only (one reaches the unit's ExecStart line), no flag the schema owns
        (``--host 0.0.0.0`` here would bypass the bind policy, ``--rpc`` the fence) and none that
        opens what the deploy keeps closed (:data:`DENIED_FLAGS`: ``--tools`` is a shell)."""
        for arg in v:
            _printable(arg)
            flag = re.split(r"[=\s]", arg, maxsplit=1)[0]  # "--api-key sk-…" in one word is still --api-key
            if flag in ("--api-key", "--api-key-file"):
                raise ValueError(f"{flag} would put a secret on the command line; use llama_server.api_key_file")
            if flag in ("--hf-token", "-hft"):
                raise ValueError(f"{flag} would put a secret on the command line; use llama_model.hf_token_file")
            if flag in OWNED_FLAGS:
                raise ValueError(f"{flag} is set by the deploy; use {OWNED_FLAGS[flag]} instead")
            if flag in DENIED_FLAGS:
                raise ValueError(f"{flag} is not allowed: it {DENIED_FLAGS[flag]}")
            if PRESET_FLAG.fullmatch(flag) and flag not in PRESET_ALLOWED:
                raise ValueError(f"{flag} is not allowed: it is a model preset of llama-server's, which downloads "
                                 "a model that no sha256 pins and sets the port, context and slots the deploy sets; "
                                 "use llama_model")
        return v

    @field_validator("api_key")
    @classmethod
    def _key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not re.fullmatch(r"[\x21-\x7e]{16,512}", v.get_secret_value()):
            raise ValueError("must be 16-512 printable characters without spaces")
        return v


class LimitsConfig(Section):
    """systemd resource controls for the service (docker mode maps the same values)."""

    #: CPU limit in CPUs (4.0 → CPUQuota=400%); None = unlimited
    cpus: Annotated[float, Field(gt=0, le=1024)] | None = None
    #: hard memory limit (MemoryMax), e.g. "8G"; None = unlimited
    memory: Size | None = None
    #: memory the kernel should protect for the service (MemoryLow / compose reservation), e.g. "4G"
    memory_reserved: Size | None = None
    #: CPUs reserved (compose reservation; systemd has no equivalent, native mode ignores it)
    cpus_reserved: Annotated[float, Field(gt=0, le=1024)] | None = None
    #: LimitMEMLOCK: "infinity" or a size; needed for load_mode "mlock"
    memlock: Size | Literal["infinity"] = "infinity"
    #: ``TasksMax``
    tasks: Annotated[int, Field(ge=16, le=1_000_000)] = 4096

    @model_validator(mode="after")
    def _reservation_within_limit(self) -> LimitsConfig:
        if self.memory and self.memory_reserved and parse_size(self.memory_reserved) > parse_size(self.memory):
            raise problem("memory_reserved", self.memory_reserved,
                          f"a reservation cannot exceed its limit (memory = {self.memory!r})")
        if self.cpus and self.cpus_reserved and self.cpus_reserved > self.cpus:
            raise problem("cpus_reserved", self.cpus_reserved,
                          f"a reservation cannot exceed its limit (cpus = {self.cpus})")
        return self


class ServiceConfig(Section):
    """Names and paths on the host."""

    #: systemd unit name
    name: Name = "llama-server"
    #: a system account of the service's own; never root (an existing login account is refused at preflight)
    user: Name = "llama"
    #: releases and the ``current`` link; one native service's own (another native service's on the host is refused)
    prefix: AbsPath = "/opt/llama.cpp"
    #: models live in ``<data_dir>/models``
    data_dir: AbsPath = "/var/lib/llama-server"
    #: key file and deploy manifest
    config_dir: AbsPath = "/etc/llama-server"
    #: sources, build trees, ccache
    cache_dir: AbsPath = "/var/cache/llama.cpp"
    #: previous releases kept on the host besides the current one (build, model files, unit);
    #: ``llamadeploy rollback`` reinstates any of them with no transfer and no compile
    keep_releases: Annotated[int, Field(ge=1, le=50)] = 2

    @model_validator(mode="after")
    def _separate_trees(self) -> ServiceConfig:
        """Each path is removed as a whole by uninstall: none may hold another."""
        paths = {"prefix": self.prefix, "data_dir": self.data_dir, "config_dir": self.config_dir,
                 "cache_dir": self.cache_dir}
        for a, pa in paths.items():
            for b, pb in paths.items():
                if a != b and (pa == pb or pb.startswith(pa + "/")):
                    raise problem(b, pb, f"must not be inside or equal to llama_service.{a} = {pa!r}: "
                                         "each is its own tree (uninstall removes them one by one)")
        return self

    @field_validator("user")
    @classmethod
    def _own_account(cls, v: str) -> str:
        if v in ("root", "nobody", "daemon", "bin", "sys", "www-data"):
            raise ValueError("must be an unprivileged account of the service's own, not root or a shared system account")
        return v


class DockerConfig(Section):
    """Docker mode: the same server, flags and model, run by Docker Compose."""

    #: where the engine comes from: Debian's packages (docker.io + docker-compose: compose v1 on
    #: Debian 12; v2 and docker-cli on 13) or Docker's own apt repository (docker-ce + compose plugin)
    engine: Literal["distro", "docker-ce"] = "distro"
    #: image reference pinned by tag; default upstream's ``server-<version>`` (CPU) or
    #: ``server-cuda-<version>`` on CUDA hosts (``llama_build.backend``), for ``llama_build.version``
    image: Annotated[str, Field(pattern=r"^[a-z0-9][\w./:-]*$")] | None = None
    #: optional digest ("sha256:..."): the image is pulled as image@digest
    image_digest: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")] | None = None
    #: controller path of a ``docker save`` tarball: pushed once, checksummed, loaded (air-gapped)
    image_tarball: ControllerPath | None = None
    #: where the compose file lives on the host
    project_dir: AbsPath = "/opt/llama-server-compose"
    #: json-file log rotation
    log_max_size: Size = "50M"
    #: json-file log files kept
    log_max_files: Annotated[int, Field(ge=1, le=100)] = 3


class HealthConfig(Section):
    """The gate after a (re)start: /health must answer 200 within the timeout."""

    #: seconds to wait for ``/health`` 200 after a (re)start
    timeout: Annotated[int, Field(ge=1, le=3600)] = 180


class FrontConfig(Section):
    """The front door (hosts with ``llama_role = "front"``): HAProxy over the fleet's servers."""

    #: address and port clients call (plain HTTP; with ``tls_pem`` see ``tls_port``)
    bind: BindAddress = "0.0.0.0"
    #: plain-HTTP port clients call
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    #: inventory group whose hosts are the backends; default: every host with llama_role "server"
    backends_group: Name | None = None
    #: "leastconn" (default), or "affinity": a conversation returns to the host whose slots hold
    #: its prefix (bounded-load consistent hashing on ``affinity_header``, else on the API key)
    balance: Literal["leastconn", "affinity"] = "leastconn"
    #: None: hash on the ``Authorization`` header, i.e. the API key
    affinity_header: Annotated[str, Field(pattern=r"^[A-Za-z0-9-]{1,64}$")] | None = "X-Session-Id"
    #: bounded load: no server takes more than this % of the average load (HAProxy hash-balance-factor)
    hash_balance_factor: Annotated[int, Field(ge=101, le=1000)] = 150
    #: seconds between health checks; a server is out after 2 failures, back after 2 successes
    check_interval: Annotated[int, Field(ge=1, le=60)] = 2
    #: a streamed reply is one response: the server timeout must cover queue wait, prompt
    #: evaluation and the whole generation
    timeout_server: Annotated[int, Field(ge=10, le=86400)] = 600
    #: how long a request may wait for a free slot in HAProxy's queue
    timeout_queue: Annotated[int, Field(ge=1, le=3600)] = 120
    #: controller path of a PEM with certificate chain and key: TLS is terminated at the front
    tls_pem: ControllerPath | None = None
    #: HTTPS port with ``tls_pem``
    tls_port: Annotated[int, Field(ge=1, le=65535)] = 8443
    #: with TLS: answer plain HTTP on ``port`` with a redirect to HTTPS
    redirect_http: bool = False
    #: HAProxy's Prometheus exporter (and nothing else) on this port
    metrics_port: Annotated[int, Field(ge=1, le=65535)] = 8405
    #: the exporter's address; default: the front's fleet address (``llama_transfer.address``,
    #: else its inventory address), not every address
    metrics_bind: BindAddress | None = None
    #: who reaches the exporter besides the inventory's monitor hosts and the front itself
    #: (nftables); ``["0.0.0.0/0", "::/0"]`` opens it to every address, on purpose
    metrics_allow_from: list[IPvAnyNetwork] = []


#: a duration as Alertmanager writes one (30s, 5m, 4h)
Duration = Annotated[str, Field(pattern=r"^[0-9]{1,5}[smhd]$")]
#: an e-mail address: one token, no spaces, quotes or control characters (it reaches a YAML file)
EmailAddress = Annotated[str, Field(pattern=r"^[A-Za-z0-9.!#$%&*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+$")]


class WebhookReceiver(Section):
    """An HTTP endpoint Alertmanager POSTs each alert group to (its webhook JSON): a chat bridge,
    a pager's inbound hook, a ticket system."""

    url: Annotated[str, Field(pattern=r"^https?://[A-Za-z0-9._~:/?#@!$&()*+,;=%-]{1,2000}$")]
    #: controller file (mode 0600) with the bearer token the endpoint expects; the token goes
    #: to a 0600 file on the monitor, never into the inventory or Alertmanager's config
    token_file: ControllerPath | None = None


class EmailReceiver(Section):
    """Mail through the site's smarthost (SMTP relay)."""

    to: Annotated[list[EmailAddress], Field(min_length=1)]
    sender: EmailAddress
    #: ``host:port`` of the relay, e.g. ``smtp.example.com:587``
    smarthost: Annotated[str, Field(pattern=r"^[A-Za-z0-9.-]+:[0-9]{1,5}$")]
    username: Annotated[str, Field(pattern=r"^[\x21-\x7e]{1,256}$")] | None = None
    #: controller file (mode 0600) with the SMTP password, as ``token_file``
    password_file: ControllerPath | None = None
    #: STARTTLS required (the default; a relay on the monitor's own LAN may not offer it)
    require_tls: bool = True


class AlertmanagerConfig(Section):
    """Alertmanager (Debian's ``prometheus-alertmanager``) on the monitor host, fed by its
    Prometheus: installed once a receiver is set. Alerts are grouped by alert and host; a
    server that is down does not also page for what follows from it (slow tokens, deferred
    requests). It listens on the monitor's loopback only: Prometheus and ``amtool`` there use it."""

    port: Annotated[int, Field(ge=1024, le=65535)] = 9093
    webhook: WebhookReceiver | None = None
    email: EmailReceiver | None = None
    #: how long a new group waits for more alerts before the first notification
    group_wait: Duration = "30s"
    #: how long before a group that changed is notified again
    group_interval: Duration = "5m"
    #: how long before a group that is still firing is notified again
    repeat_interval: Duration = "4h"

    @property
    def enabled(self) -> bool:
        return self.webhook is not None or self.email is not None


class MonitorConfig(Section):
    """The monitor (hosts with ``llama_role = "monitor"``): Prometheus from the distribution."""

    #: Prometheus web/API port
    port: Annotated[int, Field(ge=1, le=65535)] = 9090
    #: Prometheus's address; default: the monitor's fleet address (``llama_transfer.address``,
    #: else its inventory address), not every address
    bind: BindAddress | None = None
    #: who reaches Prometheus (its API and UI: a Grafana, the operators' network) besides the
    #: monitor itself (nftables); ``["0.0.0.0/0", "::/0"]`` opens it to every address, on purpose
    allow_from: list[IPvAnyNetwork] = []
    #: scrape and rule evaluation interval
    scrape_interval: Annotated[str, Field(pattern=r"^[0-9]+[smh]$")] = "15s"
    #: TSDB retention
    retention: Annotated[str, Field(pattern=r"^[0-9]+[hdwy]$")] = "15d"
    #: where alerts go (Alertmanager on this host); nothing is installed without a receiver
    alertmanager: AlertmanagerConfig = AlertmanagerConfig()


class NodeExporterConfig(Section):
    """Host metrics: Debian's ``prometheus-node-exporter`` on every host of an inventory that has a
    monitor (nobody would scrape it otherwise), on the host's fleet address, fenced to the
    monitors. Its systemd collector covers the units the deploy runs (restarts included)."""

    #: false: no node exporter on this host even when the inventory has a monitor
    enabled: bool = True
    #: the exporter's port, on the host's fleet address
    port: Annotated[int, Field(ge=1024, le=65535)] = 9100


class TransferConfig(Section):
    """How the big files (models, built releases) reach the hosts.

    ``direct`` (the default): the controller sends each file to each host. Nothing extra is
    installed and nothing listens; right for a handful of hosts, and what a host falls back to.
    ``fanout``: the controller sends each file once; from then on hosts that hold a verified
    copy serve it (busybox httpd, fenced by nftables to the run's hosts, only while the run
    transfers) and the others pull byte ranges from several of them at once with aria2,
    doubling the holders every round: about log2(N) copy times instead of N over one uplink.
    """

    #: ``fanout``: the controller sends each model/release once, hosts serve each other (see [fan-out](fanout.md))
    mode: Literal["direct", "fanout"] = "direct"
    #: TCP port peers serve on (bound to ``address`` only, open to the run's hosts only)
    port: Annotated[int, Field(ge=1024, le=65535)] = 8090
    #: how many peers one host pulls from at once (ranges of one file from each)
    sources: Annotated[int, Field(ge=1, le=16)] = 4
    #: the address other hosts reach this one at; default: its inventory address, resolved on
    #: the controller (set it when hosts talk over a private network the controller is not on)
    address: IPvAnyAddress | None = None
    #: the longest a peer server runs (seconds): it stops by itself after this, even when the
    #: run that started it was killed
    timeout: Annotated[int, Field(ge=60, le=86400)] = 3600


class RpcConfig(Section):
    """llama.cpp's RPC backend: a head's llama-server puts layers on its workers' ggml-rpc-server.

    For models that do not fit one host. The protocol has no authentication and open
    memory-safety issues: a worker binds its private address, and nftables lets only its
    head(s) reach the port. Head and workers run the same release.
    """

    #: on a head: the inventory group whose hosts (``llama_role = "rpc_worker"``) are its workers
    workers_group: Name | None = None
    #: on a worker: the port ggml-rpc-server listens on
    port: Annotated[int, Field(ge=1024, le=65535)] = 50052
    #: on a worker: the private address it binds and its head connects to; default: its
    #: inventory address, resolved on the controller
    address: IPvAnyAddress | None = None
    #: on a worker: ggml-rpc-server's local tensor cache (``-c``): a restarted head sends the
    #: weights once, later loads are read from the worker's disk
    cache: bool = False
    #: on a head: layers per member, head first (``[6, 6, 6]``), instead of following the
    #: members' memory limits
    split: list[Annotated[int, Field(ge=0, le=1024)]] | None = None


class GpuConfig(Section):
    """NVIDIA GPU hosts (``llama_build.backend = "cuda"``): driver and toolkit, and the offload fit.

    With ``llama_server.gpu_layers`` 0 (the default) a CUDA host runs llama.cpp's own fit
    (``llama-fit-params``) at deploy time and pins its result (``-ngl``, ``-c``, split) in the
    unit, so every restart behaves the same; a number > 0 wins over the fit.
    """

    #: free MiB the fit leaves on each GPU (``--fit-target``; llama.cpp's default 1024)
    fit_margin_mib: Annotated[int, Field(ge=0, le=1048576)] = 1024
    #: when the driver or nvcc is missing: "no" refuses the host with a message; "distro" installs
    #: Debian's non-free ``nvidia-driver`` + ``nvidia-cuda-toolkit``; "nvidia" NVIDIA's own apt
    #: repository (``cuda-drivers`` + ``cuda-toolkit``, and ``nvidia-container-toolkit`` in docker mode)
    install: Literal["no", "distro", "nvidia"] = "no"
    #: NVIDIA's apt repository (its ``cuda-keyring`` package comes from there); default: the one
    #: for the host's Debian release and architecture, ``.../cuda/repos/debian13/x86_64`` on trixie
    nvidia_repo: Annotated[str, Field(pattern=r"^https://[A-Za-z0-9./_-]+$")] | None = None
    #: controller directory of ``.deb`` files installed instead of downloading (air-gapped hosts)
    packages_dir: ControllerPath | None = None


class HostConfig(Section):
    """Everything about one host. Build with :func:`config_for`."""

    #: ``native`` (built on the host, systemd unit) or ``docker`` (Docker Compose)
    mode: Literal["native", "docker"] = "native"
    build: BuildConfig = BuildConfig()
    docker: DockerConfig = DockerConfig()
    model: ModelConfig = ModelConfig()
    #: several models behind one address (router mode); ``llama_model`` is the one-model shorthand
    models: list[RouterModel] = []
    router: RouterConfig = RouterConfig()
    server: ServerConfig = ServerConfig()
    limits: LimitsConfig = LimitsConfig()
    service: ServiceConfig = ServiceConfig()
    health: HealthConfig = HealthConfig()
    front: FrontConfig = FrontConfig()
    monitor: MonitorConfig = MonitorConfig()
    node_exporter: NodeExporterConfig = NodeExporterConfig()
    transfer: TransferConfig = TransferConfig()
    rpc: RpcConfig = RpcConfig()
    gpu: GpuConfig = GpuConfig()
    #: what this host is: a llama-server ("server"), the HAProxy front door ("front"), or the
    #: Prometheus monitor ("monitor"); set it per group, e.g. ``front = [("lb1", {"llama_role": "front"})]``
    role: Literal["server", "front", "monitor", "rpc_worker"] = "server"
    #: how a deploy knows the models on a host are intact: "recorded" hashes a file once and then
    #: trusts its size, inode, mtime and ctime recorded with the hash; "full" hashes every file
    #: this run (``pyinfra INVENTORY deploy.py --data llama_verify=full``)
    verify: Literal["recorded", "full"] = "recorded"

    @model_validator(mode="after")
    def _not_open_by_default(self) -> HostConfig:
        """An API on the network without a key is how many Ollama servers ended up open to everyone."""
        import ipaddress

        s = self.server
        if self.role != "server":
            return self
        if s.api_key is None and not s.allow_unauthenticated and not ipaddress.ip_address(s.host).is_loopback:
            raise problem(
                "server.host", s.host,
                "binding a non-loopback address without llama_server.api_key serves /v1 and /metrics to "
                "anyone who can reach it; set llama_server.api_key_file (create one: llamadeploy key new FILE), "
                "bind 127.0.0.1, or set llama_server.allow_unauthenticated = True",
            )
        return self

    @model_validator(mode="after")
    def _compose_project_apart(self) -> HostConfig:
        svc, project = self.service, self.docker.project_dir
        for name in ("prefix", "data_dir", "config_dir", "cache_dir"):
            other = getattr(svc, name)
            if project == other or project.startswith(other + "/") or other.startswith(project + "/"):
                raise problem("docker.project_dir", project,
                              f"must be apart from llama_service.{name} = {other!r} (uninstall removes each tree)")
        return self

    @model_validator(mode="after")
    def _rpc_options(self) -> HostConfig:
        if self.role == "rpc_worker" and self.mode != "native":
            raise problem("mode", self.mode, "an RPC worker runs ggml-rpc-server from a native build; "
                          "set llama_mode 'native' for the workers")
        if self.role == "rpc_worker" and self.rpc.address is not None and self.rpc.address.version != 4:
            raise problem("rpc.address", str(self.rpc.address),
                          "ggml-rpc-server (b11434) binds IPv4 only; give the worker's private IPv4 address")
        if self.rpc.workers_group and self.mode != "native":
            raise problem("rpc.workers_group", self.rpc.workers_group,
                          "an RPC head needs llama_mode 'native' (its release must match its workers')")
        if self.rpc.workers_group and self.server.gpu_layers:
            raise problem("server.gpu_layers", self.server.gpu_layers,
                          "an RPC head sets the layers it offloads to its workers itself; "
                          "use llama_rpc.split to choose them")
        return self

    @model_validator(mode="after")
    def _gpu_options(self) -> HostConfig:
        if self.mode == "native" and self.server.gpu_layers and not self.cuda:
            raise problem("server.gpu_layers", self.server.gpu_layers,
                          "a CPU build has no GPU to offload to; set llama_build.backend 'cuda' for NVIDIA hosts")
        if self.build.backend == "cuda" and self.role == "rpc_worker":
            raise problem("build.backend", self.build.backend,
                          "an RPC worker runs a CPU release (its memory is what the head borrows); use 'cpu'")
        if self.build.backend == "cuda" and self.rpc.workers_group:
            raise problem("build.backend", self.build.backend,
                          "an RPC head runs the CPU release of its workers (llama_rpc.split places the layers)")
        return self

    @model_validator(mode="after")
    def _router_options(self) -> HostConfig:
        """Router mode is built for CPU servers, native or docker; what it does not cover yet is refused, not guessed."""
        if not self.models:
            return self
        aliases = [m.alias for m in self.models]
        if "model" in self.model_fields_set:
            raise problem("model", self.model.model_dump(exclude_defaults=True),
                          "give llama_model (one model) or llama_models (several), not both")
        if len(self.models) < 2:
            raise problem("models", aliases, "one model is llama_model's (no router); llama_models needs two or more")
        dup = sorted({a for a in aliases if aliases.count(a) > 1})
        if dup:
            raise problem("models", aliases, f"aliases must be unique; repeated: {', '.join(dup)}")
        refused = [
            ("build.backend", self.build.backend, self.cuda, "router mode is not built for GPU hosts yet (one fit per model)"),
            ("rpc.workers_group", self.rpc.workers_group, bool(self.rpc.workers_group), "an RPC head serves one model"),
            ("role", self.role, self.role != "server", "only a server holds models"),
        ]
        for field, value, refuse, message in refused:
            if refuse:
                raise problem(field, value, message)
        startup = [m.alias for m in self.models if m.load == "startup"]
        if self.router.models_max and len(startup) > self.router.models_max:
            raise problem("router.models_max", self.router.models_max,
                          f"{len(startup)} models load at startup ({', '.join(startup)}); allowed: at least "
                          f"{len(startup)}, or 0 (no limit), or fewer models with load 'startup'")
        return self

    @property
    def router_mode(self) -> bool:
        """Several models in one llama-server (``llama_models``)."""
        return bool(self.models)

    @property
    def cuda(self) -> bool:
        """Whether this host serves from NVIDIA GPUs (a CUDA build, or docker's CUDA image)."""
        return (self.build.backend == "cuda" or self.build.cmake_args.get("GGML_CUDA") == "ON"
                or (self.mode == "docker" and self.server.gpu_layers > 0))

    @model_validator(mode="after")
    def _transfer_port_apart(self) -> HostConfig:
        """The fan-out's fence drops its port for everyone but the fleet while peers serve: on the
        server's (or the front's) port that would cut clients off."""
        if self.transfer.mode != "fanout":
            return self
        taken = {"server.port": self.server.port}
        if self.role == "front":
            taken |= {"front.port": self.front.port, "front.tls_port": self.front.tls_port,
                      "front.metrics_port": self.front.metrics_port}
        if self.role == "monitor":
            taken["monitor.port"] = self.monitor.port
        for name, port in taken.items():
            if port == self.transfer.port:
                raise problem("transfer.port", self.transfer.port,
                              f"is llama_{name} too; peers need a port of their own "
                              "(the fan-out's fence drops it for every address outside the fleet)")
        return self

    @model_validator(mode="after")
    def _mode_options(self) -> HostConfig:
        if self.mode == "docker" and self.server.load_mode and "mlock" in self.server.load_mode:
            raise problem("server.load_mode", self.server.load_mode,
                          "docker mode cannot lock memory (the container has no CAP_IPC_LOCK); "
                          "use 'mmap', 'none' or 'auto', or llama_mode 'native'")
        if self.mode == "docker" and self.server.allow_from is not None:
            raise problem("server.allow_from", [str(n) for n in self.server.allow_from],
                          "docker mode publishes the port past the host's input chain, where these rules "
                          "would not apply; bind llama_server.host to a private address, or llama_mode 'native'")
        return self

    @property
    def docker_image(self) -> str:
        if self.docker.image:
            return self.docker.image
        variant = "server-cuda" if self.cuda else "server"
        return f"ghcr.io/ggml-org/llama.cpp:{variant}-{self.build.version}"

    @property
    def model_dir(self) -> str:
        return f"{self.service.data_dir}/models"

    @property
    def api_key_path(self) -> str:
        return f"{self.service.config_dir}/api-key"

    @property
    def host_key_file(self) -> str:
        """The host file with the API key in this host's mode (docker mounts its own copy)."""
        return self.api_key_path if self.mode == "native" else f"{self.service.config_dir}/docker-api-key"

    @property
    def release_dir(self) -> str:
        return f"{self.service.prefix}/releases/{self.build.release_key()}"

    @property
    def current_link(self) -> str:
        return f"{self.service.prefix}/current"


SECTIONS = tuple(HostConfig.model_fields)
