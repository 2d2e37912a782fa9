"""The single source of every setting a host can have.

Settings come from pyinfra inventory data under keys named ``llama_<section>``
(``llama_mode``, ``llama_build``, ``llama_model``, ``llama_server``,
``llama_limits``, ``llama_service``, ``llama_health``). Section dicts are
deep-merged from the least to the most specific layer (all → groups → host), so
a host can override ``llama_server["port"]`` without repeating the rest of its
group's ``llama_server``.

Why validate everything up front: a fleet deploy that changes three hosts and
then dies on the fourth because of a typo leaves the fleet in a mixed state.
:func:`validate_inventory` checks every host before any operation runs and
reports every problem at once, naming host, field, value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from llamadeploy.artifacts import file_sha256
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

#: Data keys on a pyinfra host that belong to us.
PREFIX = "llama_"

SIZE_RE = re.compile(r"^[0-9]+[KMGT]?$")
Size = Annotated[str, Field(pattern=SIZE_RE.pattern, description="bytes, or a number with K/M/G/T")]
AbsPath = Annotated[str, Field(pattern=r"^/[^\s]*$", description="an absolute path without spaces")]
Name = Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")]


class Section(BaseModel):
    """Strict base: unknown keys and wrong types are errors, never ignored."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class BuildConfig(Section):
    """How llama.cpp is fetched and compiled on the host (native mode)."""

    version: Annotated[str, Field(pattern=r"^b[0-9]+$")] = "b11434"
    #: commit hash or name recorded in ``llama-server --version``; defaults to the version
    commit: str | None = None
    source: Literal["git", "tarball"] = "git"
    git_url: str = "https://github.com/ggml-org/llama.cpp.git"
    #: controller path of a source tarball (air-gapped hosts, CI)
    tarball: str | None = None
    #: directory inside the tarball that holds llama.cpp's top CMakeLists.txt
    tarball_subdir: str = "."
    #: GGML_NATIVE: tune for the build host's CPU; turn off for portable builds
    native: bool = True
    blas: Literal["none", "openblas"] = "none"
    #: extra ``-D`` options, e.g. ``{"GGML_AVX512": "OFF"}``
    cmake_args: dict[str, str] = {}
    ccache: bool = True
    #: parallel compile jobs; ``None`` means all CPUs of the host
    jobs: Annotated[int, Field(ge=1, le=1024)] | None = None

    @model_validator(mode="after")
    def _tarball_needs_path(self) -> "BuildConfig":
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
        }
        if self.blas == "openblas":
            opts |= {"GGML_BLAS": "ON", "GGML_BLAS_VENDOR": "OpenBLAS"}
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
    filename: str | None = None
    #: instead of filename: a quantization such as "Q4_K_M", matched against the repo's .gguf files
    quant: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+$")] | None = None
    #: branch, tag or commit; recorded as the commit hash it resolves to
    revision: Annotated[str, Field(pattern=r"^[\w./-]{1,100}$")] = "main"
    #: controller path of a .gguf file (no Hub involved)
    path: str | None = None
    #: expected sha256 of the (single) file; default: the Hub's LFS sha256 / the controller file's
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    #: name shown by /v1/models and accepted as "model" in requests
    alias: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:/-]{1,128}$")] | None = None
    #: controller: download once on the controller, push to hosts; host: each host downloads
    distribution: Literal["controller", "host"] = "controller"
    #: Hub endpoint (an on-prem mirror); default: the controller's HF_ENDPOINT or huggingface.co
    hf_endpoint: Annotated[str, Field(pattern=r"^https?://[^\s]+$")] | None = None
    #: controller file holding a Hub token (gated repos); default: HF_TOKEN / huggingface_hub's login
    hf_token_file: str | None = None

    @field_validator("path")
    @classmethod
    def _gguf(cls, v: str | None) -> str | None:
        if v is not None and not v.endswith(".gguf"):
            raise ValueError("must be a .gguf file")
        return v

    @field_validator("catalog")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        from llamadeploy.catalog import CATALOG

        if v is not None and v not in CATALOG:
            raise ValueError(f"unknown catalog model (known: {', '.join(CATALOG)})")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
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


class ServerConfig(Section):
    """llama-server flags. ``None`` means: computed from host facts (see tuning)."""

    host: str = "0.0.0.0"
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
    #: layers offloaded to a GPU; 0 = CPU only
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
    #: NUMA policy: auto = "distribute" on hosts with several NUMA nodes, nothing otherwise
    numa: Literal["auto", "off", "distribute", "isolate", "numactl"] = "auto"
    metrics: bool = True
    #: bearer key for /v1/*; stored 0600 on the host, never on a command line
    api_key: SecretStr | None = None
    #: extra arguments appended verbatim (escape hatch)
    extra_args: list[str] = []

    @field_validator("host")
    @classmethod
    def _addr(cls, v: str) -> str:
        import ipaddress

        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError("must be an IP address to bind, e.g. 0.0.0.0 or 127.0.0.1") from None
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
    tasks: Annotated[int, Field(ge=16, le=1_000_000)] = 4096


class ServiceConfig(Section):
    """Names and paths on the host."""

    name: Name = "llama-server"
    user: Name = "llama"
    prefix: AbsPath = "/opt/llama.cpp"
    data_dir: AbsPath = "/var/lib/llama-server"
    config_dir: AbsPath = "/etc/llama-server"
    cache_dir: AbsPath = "/var/cache/llama.cpp"


class DockerConfig(Section):
    """Docker mode: the same server, flags and model, run by Docker Compose."""

    #: where the engine comes from: Debian/Ubuntu packages (docker.io + docker-compose v1)
    #: or Docker's own apt repository (docker-ce + the compose v2 plugin)
    engine: Literal["distro", "docker-ce"] = "distro"
    #: image reference pinned by tag; default upstream's ``server-<version>`` (CPU) or
    #: ``server-cuda-<version>`` when ``gpu_layers > 0``, for ``llama_build.version``
    image: Annotated[str, Field(pattern=r"^[a-z0-9][\w./:-]*$")] | None = None
    #: optional digest ("sha256:..."): the image is pulled as image@digest
    image_digest: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")] | None = None
    #: controller path of a ``docker save`` tarball: pushed once, checksummed, loaded (air-gapped)
    image_tarball: str | None = None
    #: where the compose file lives on the host
    project_dir: AbsPath = "/opt/llama-server-compose"
    #: json-file log rotation
    log_max_size: Size = "50M"
    log_max_files: Annotated[int, Field(ge=1, le=100)] = 3


class HealthConfig(Section):
    """The gate after a (re)start: /health must answer 200 within the timeout."""

    timeout: Annotated[int, Field(ge=1, le=3600)] = 180


class HostConfig(Section):
    """Everything about one host. Build with :func:`config_for`."""

    mode: Literal["native", "docker"] = "native"
    build: BuildConfig = BuildConfig()
    docker: DockerConfig = DockerConfig()
    model: ModelConfig = ModelConfig()
    server: ServerConfig = ServerConfig()
    limits: LimitsConfig = LimitsConfig()
    service: ServiceConfig = ServiceConfig()
    health: HealthConfig = HealthConfig()

    @property
    def docker_image(self) -> str:
        if self.docker.image:
            return self.docker.image
        variant = "server-cuda" if self.server.gpu_layers > 0 else "server"
        return f"ghcr.io/ggml-org/llama.cpp:{variant}-{self.build.version}"

    @property
    def model_dir(self) -> str:
        return f"{self.service.data_dir}/models"

    @property
    def api_key_path(self) -> str:
        return f"{self.service.config_dir}/api-key"

    @property
    def release_dir(self) -> str:
        return f"{self.service.prefix}/releases/{self.build.release_key()}"

    @property
    def current_link(self) -> str:
        return f"{self.service.prefix}/current"


SECTIONS = tuple(HostConfig.model_fields)


class ConfigError(Exception):
    """All problems of all hosts; its message is what the operator reads."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            "invalid llama configuration, nothing was changed on any host:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def raw_settings(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge data layers (least specific first) into the dict the model parses."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if not key.startswith(PREFIX):
                continue
            section = key[len(PREFIX):]
            if isinstance(value, dict) and isinstance(merged.get(section), dict):
                merged[section] = _deep_merge(merged[section], value)
            else:
                merged[section] = value
    return merged


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    field = f"{PREFIX}{loc}" if loc else "llama_*"
    if err["type"] == "extra_forbidden":
        section = str(err["loc"][0])
        if len(err["loc"]) == 1:
            return f"{field}: unknown setting (allowed: {', '.join(PREFIX + s for s in SECTIONS)})"
        model = HostConfig.model_fields[section].annotation
        allowed = ", ".join(getattr(model, "model_fields", {})) or "none"
        return f"{field}: unknown setting (allowed in {PREFIX}{section}: {allowed})"
    value = err.get("input")
    if isinstance(value, SecretStr) or "api_key" in loc:
        shown = "<hidden>"
    else:
        shown = repr(value)
    return f"{field} = {shown}: {err['msg']}"


def parse_config(host_name: str, layers: list[dict[str, Any]]) -> tuple[HostConfig | None, list[str]]:
    """Validate one host's data; returns the config or the list of problems."""
    try:
        return HostConfig.model_validate(raw_settings(layers)), []
    except ValidationError as exc:
        return None, [f"host {host_name}: {_describe(e)}" for e in exc.errors()]


def host_layers(host: Any) -> list[dict[str, Any]]:
    """The data layers of a pyinfra host, least specific first.

    pyinfra's ``HostData`` keeps its layers in ``datas`` (override, host, groups,
    all). We read them to deep-merge our section dicts; pyinfra itself only
    merges shallowly.
    """
    datas = getattr(host.data, "datas", None)
    if datas is None:  # pragma: no cover - older pyinfra
        return [host.data.dict()]
    layers = []
    for data in reversed(datas):
        data = data() if callable(data) else data
        layers.append(dict(data))
    return layers


_VALIDATED: dict[int, dict[str, HostConfig]] = {}


def validate_inventory(inventory: Any) -> dict[str, HostConfig]:
    """Validate every host of the inventory; raise one :class:`ConfigError` listing all problems.

    pyinfra runs ``deploy.py`` once per host; the first call validates all hosts
    (so the first host cannot be changed before the last one is checked) and
    later calls reuse the result.
    """
    if id(inventory) in _VALIDATED:
        return _VALIDATED[id(inventory)]
    configs: dict[str, HostConfig] = {}
    problems: list[str] = []
    for host in inventory:
        cfg, errs = parse_config(host.name, host_layers(host))
        problems += errs
        if cfg is not None:
            configs[host.name] = cfg
            # files the deploy pushes from the controller must exist there
            controller_files = {
                "model.path": cfg.model.path,
                "docker.image_tarball": cfg.docker.image_tarball if cfg.mode == "docker" else None,
                "build.tarball": cfg.build.tarball if cfg.mode == "native" and cfg.build.source == "tarball" else None,
            }
            for field, path in controller_files.items():
                if path is not None and not Path(path).is_file():
                    problems.append(f"host {host.name}: {PREFIX}{field} = {path!r}: no such file on the controller")
            model_file = cfg.model.path
            if model_file and Path(model_file).is_file() and cfg.model.sha256 and file_sha256(model_file) != cfg.model.sha256:
                problems.append(
                    f"host {host.name}: {PREFIX}model.sha256 = {cfg.model.sha256!r}: "
                    f"the controller file {model_file} has sha256 {file_sha256(model_file)}"
                )
    if problems:
        raise ConfigError(problems)
    _VALIDATED[id(inventory)] = configs
    return configs
