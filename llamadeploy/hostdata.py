"""Reading pyinfra host data into :class:`~llamadeploy.config.HostConfig`, for every host at once.

Section dicts are deep-merged from the least to the most specific layer (all →
groups → host), so a host can override ``llama_server["port"]`` without
repeating the rest of its group's ``llama_server`` (pyinfra itself merges
shallowly).

Why validate everything up front: a fleet deploy that changes three hosts and
then dies on the fourth because of a typo leaves the fleet in a mixed state.
:func:`validate_inventory` checks every host, and the controller files the
deploy will push, before any operation runs, and reports every problem at once,
naming host, field, value and what is allowed.
"""

from __future__ import annotations

import os
import re
import weakref
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError
from pydantic_core import ErrorDetails
from pyinfra.api import DeployError

from llamadeploy.artifacts import file_sha256
from llamadeploy.config import PREFIX, SECTIONS, HostConfig


class ConfigError(DeployError):
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


#: llama-server flags whose value is a secret: an ``extra_args`` list that carries one (refused,
#: with the field to use instead) is shown with that value hidden
SECRET_FLAGS = ("--api-key", "--hf-token", "-hft")


def _hide_secret_args(value: list[Any] | tuple[Any, ...]) -> list[Any]:
    """``value`` with the word after a secret flag, or what follows the flag in its own word
    (``--api-key=…``, ``--api-key …``), replaced by ``<hidden>`` (pure)."""
    out: list[Any] = []
    for i, word in enumerate(value):
        flag = re.split(r"[=\s]", word, maxsplit=1)[0] if isinstance(word, str) else None
        if i and str(value[i - 1]).strip() in SECRET_FLAGS:
            out.append("<hidden>")
        elif flag in SECRET_FLAGS and flag != word.strip():
            out.append(f"{flag}{word[len(flag)]}<hidden>")
        else:
            out.append(word)
    return out


def _describe(err: ErrorDetails) -> str:
    if err["type"] == "field_problem":  # a cross-field check naming one field (config.problem)
        ctx = err.get("ctx") or {}
        err = {**err, "loc": (*err["loc"], *str(ctx["field"]).split(".")), "input": ctx["value"]}
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
    elif len(err["loc"]) == 1 and str(err["loc"][0]) in ("server", "model") and not isinstance(value, dict):
        shown = f"<a {type(value).__name__}>"  # a whole section given as a value may be a pasted key
    elif isinstance(value, dict) and any("key" in str(k) or "token" in str(k) for k in value):
        shown = "{...}"
    elif isinstance(value, (list, tuple)):
        shown = repr(_hide_secret_args(value))
    elif isinstance(value, str) and loc.endswith("extra_args") and any(f in value for f in SECRET_FLAGS):
        shown = "<hidden>"  # a whole command line given as one string
    else:
        shown = repr(value)
    return f"{field} = {shown}: {err['msg']}"


def parse_config(host_name: str, layers: list[dict[str, Any]]) -> tuple[HostConfig | None, list[str]]:
    """Validate one host's data; returns the config or the list of problems."""
    settings = raw_settings(layers)
    key_problem = _load_key_file(settings)
    if key_problem:
        return None, [f"host {host_name}: {key_problem}"]
    try:
        return HostConfig.model_validate(settings), []
    except ValidationError as exc:
        return None, [f"host {host_name}: {_describe(e)}" for e in exc.errors()]


def _load_key_file(settings: dict[str, Any]) -> str | None:
    """Put the key of ``llama_server.api_key_file`` (a controller file) into ``api_key``.

    The file must be the operator's alone (no group or other access), as
    ``llamadeploy key new`` writes it; the key itself never appears in a message.
    """
    server = settings.get("server")
    if not isinstance(server, dict) or server.get("api_key_file") is None:
        return None
    path = server["api_key_file"]
    field = f"{PREFIX}server.api_key_file = {path!r}"
    if server.get("api_key") is not None:
        return f"{field}: give api_key or api_key_file, not both"
    if not isinstance(path, str):
        return f"{field}: must be a controller file path"
    try:
        st = os.stat(path)
        key = Path(path).read_text().strip()
    except OSError as exc:
        return f"{field}: {exc.strerror} on the controller (create it: llamadeploy key new {path})"
    if st.st_mode & 0o077:
        return f"{field}: mode {oct(st.st_mode & 0o777)[2:]} lets others read the key; chmod 600 {path}"
    settings["server"] = {**server, "api_key": key}
    return None


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


#: one result per inventory object, dropped with it (pyinfra runs deploy.py once per host)
_VALIDATED: weakref.WeakKeyDictionary[Any, dict[str, HostConfig]] = weakref.WeakKeyDictionary()


def validate_inventory(inventory: Any) -> dict[str, HostConfig]:
    """Validate every host of the inventory; raise one :class:`ConfigError` listing all problems.

    pyinfra runs ``deploy.py`` once per host; the first call validates all hosts
    (so the first host cannot be changed before the last one is checked) and
    later calls with the same inventory object reuse the result.
    """
    try:
        return _VALIDATED[inventory]
    except (KeyError, TypeError):  # TypeError: a plain list of hosts (tests) is not weak-referenceable
        pass
    configs: dict[str, HostConfig] = {}
    problems: list[str] = []
    for host in inventory:
        cfg, errs = parse_config(host.name, host_layers(host))
        problems += errs
        if cfg is not None:
            configs[host.name] = cfg
            problems += controller_file_problems(host.name, cfg)
    if problems:
        raise ConfigError(problems)
    try:
        _VALIDATED[inventory] = configs
    except TypeError:
        pass
    return configs


def controller_file_problems(host_name: str, cfg: HostConfig) -> list[str]:
    """Files the deploy pushes from the controller must exist there (and match a pinned hash)."""
    problems = []
    controller_files = {
        "model.path": cfg.model.path,
        "docker.image_tarball": cfg.docker.image_tarball if cfg.mode == "docker" else None,
        "build.tarball": cfg.build.tarball if cfg.mode == "native" and cfg.build.source == "tarball" else None,
    }
    for n, m in enumerate(cfg.models):  # router mode: each model's controller file too
        controller_files[f"models[{n}].path"] = m.path
    for field, path in controller_files.items():
        if path is not None and not Path(path).is_file():
            problems.append(f"host {host_name}: {PREFIX}{field} = {path!r}: no such file on the controller")
    am = cfg.monitor.alertmanager if cfg.role == "monitor" else None
    secrets = {"model.hf_token_file": cfg.model.hf_token_file,
               "front.tls_pem": cfg.front.tls_pem if cfg.role == "front" else None,
               "monitor.alertmanager.webhook.token_file": am.webhook.token_file if am and am.webhook else None,
               "monitor.alertmanager.email.password_file": am.email.password_file if am and am.email else None}
    for field, path in secrets.items():
        if path is not None:
            problem = secret_file_problem(path)
            if problem:
                problems.append(f"host {host_name}: {PREFIX}{field} = {path!r}: {problem}")
    if cfg.role == "front" and cfg.front.tls_pem and not problems:
        problem = pem_problem(cfg.front.tls_pem)
        if problem:
            problems.append(f"host {host_name}: {PREFIX}front.tls_pem = {cfg.front.tls_pem!r}: {problem}")
    pinned = [("model", cfg.model), *((f"models[{n}]", m) for n, m in enumerate(cfg.models))]
    for field, spec in pinned:
        if spec.path and Path(spec.path).is_file() and spec.sha256:
            actual = file_sha256(spec.path)
            if actual != spec.sha256:
                problems.append(f"host {host_name}: {PREFIX}{field}.sha256 = {spec.sha256!r}: "
                                f"the controller file {spec.path} has sha256 {actual}")
    return problems


def secret_file_problem(path: str) -> str | None:
    """A controller file holding a secret (a key, a token, a TLS key) must exist and be the
    operator's alone: a file others can read has leaked already, so it is refused, not used."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{exc.strerror} on the controller"
    if st.st_mode & 0o077:
        return f"mode {oct(st.st_mode & 0o777)[2:]} lets others read the secret; chmod 600 {path}"
    return None


def pem_problem(path: str) -> str | None:
    """The front's PEM must parse as a certificate chain plus its private key, and the key must be
    the certificate's: checked with ``openssl`` before any host changes, so a bad PEM never
    replaces a good one (HAProxy would refuse it at the reload and at every later restart)."""
    import subprocess

    def pubkey(*args: str) -> str | None:
        proc = subprocess.run(["openssl", *args, "-in", path], capture_output=True, text=True, timeout=30)
        return proc.stdout.strip() if proc.returncode == 0 and "BEGIN PUBLIC KEY" in proc.stdout else None

    cert = pubkey("x509", "-noout", "-pubkey")
    if cert is None:
        return "holds no certificate openssl can read; allowed: a PEM with the certificate chain and its key"
    key = pubkey("pkey", "-pubout")
    if key is None:
        return "holds no private key openssl can read; append the certificate's key to the file"
    if key != cert:
        return "its private key does not belong to its (first) certificate"
    return None
