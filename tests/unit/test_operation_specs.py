"""Data-driven tests of our pyinfra operations, in pyinfra's own style: given facts, expected commands.

Every ``tests/operations/<op path>/<case>.json`` is one test (id ``<op path>/<case>``).
``<op path>`` is the operation's import path after ``llamadeploy.``, e.g.
``roles.build.operations.build_release`` or ``atomic.put``.

The layout and the case keys follow pyinfra's ``tests/operations/*/*.json`` (run by
pyinfra's ``tests/test_operations.py`` with ``FakeState``/``FakeHost``); the small
harness below is modelled on pyinfra's ``tests/util.py``. (The ``pyinfra-testing``
package ships the same harness and works with pyinfra 3.10, but it generates one
``unittest`` class per folder, keys facts by the last module segment only, and
reads every uploaded file object, which would open the real controller file behind
``verified_file``'s ``ProgressReader``; so we keep our own, and no new dependency.)

Case keys (anything else is an error, so a typo cannot silently skip a check):

``args``, ``kwargs``
    Positional and keyword arguments of the operation (bound against its signature,
    so an unknown name fails). Arguments listed in :data:`ARG_ADAPTERS` are converted
    from JSON first: ``build_release``'s ``build`` is a dict validated into
    :class:`~llamadeploy.config.BuildConfig`; ``atomic.put``'s ``src`` is a string
    wrapped in ``StringIO``.
``global_arguments``
    pyinfra's global arguments of the operation call (``{"_sudo": true}``), as
    ``host.current_op_global_arguments``; default: none.
``facts``
    What ``host.get_fact`` returns, keyed by fact name: the fact class's module with a
    leading ``pyinfra.facts.`` or ``llamadeploy.`` removed, a dot, the class name
    (``files.File``, ``server.Command``, ``facts.ServerHelp``,
    ``roles.docker.facts.DockerImageId``). A fact read with arguments maps pyinfra's
    kwargs string of those arguments to the value (``{"path=/x": null}``, as in
    pyinfra's tests). Arguments must be real arguments of the fact's ``command``.
    Values are handed over as JSON gives them (a list stands in for a ``frozenset``
    fact such as ``ServerHelp``). Facts in :data:`SIMULATED_FACTS` take a random argument
    (a nonce): their table is keyed without it and holds what the host has, from which
    the harness computes the fact's answer. A fact the operation asks for but the case lacks
    fails the test, and so does a case entry the operation never asked for (no stale facts).
``commands``
    The commands the operation yields, in order, each compared as a string or list:

    * a ``str`` or ``StringCommand``: its raw string (pyinfra strips yielded strings);
      if masked and raw forms differ, ``{"raw": ..., "masked": ...}`` as in pyinfra
    * a ``FileUploadCommand``: ``["upload", src, dest]`` where ``src`` is the path for a
      controller path (``str``), the text for an in-memory ``StringIO``/``BytesIO``, and
      ``repr(src)`` for any other file object (``ProgressReader``'s repr is its path),
      then the remote temp file name when the operation chooses one
    * a command with connector arguments (``_sudo`` ...): ``{"command": <the above>, **args}``
``noop_description``
    The argument of ``host.noop(...)``. Without this key the operation must not call
    ``host.noop``; a case whose ``commands`` is empty must give it.
``exception``
    ``{"name": "OperationError", "message": "..."}``: the operation raises that class
    with exactly that message (``str(exc)``); ``commands`` then lists what it yielded
    before raising (default: nothing).
``executing``
    ``false``: the operation runs while pyinfra prepares (change detection), not at execution;
    default ``true``.
``fleet``
    For the transfer role's operations: the run's fan-out they read
    (:class:`~llamadeploy.roles.transfer.fleet.Fleet` fields, ``members`` as a list of
    :class:`~llamadeploy.roles.transfer.fleet.Member` fields, ``active``: the hosts still in
    the run, in inventory order, ``serving``: round -> the hosts whose server answered); the
    host the case runs on is ``host`` (default ``testhost``).
``description``
    Free text for the reader; ignored.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from importlib import import_module
from inspect import getcallargs, getfullargspec, signature
from io import BytesIO, StringIO
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api import FileDownloadCommand, FileUploadCommand, FunctionCommand, StringCommand
from pyinfra.api.arguments import all_argument_meta
from pyinfra.api.util import get_kwargs_str
from pyinfra.context import ctx_host

from llamadeploy.atomic import HashState
from llamadeploy.config import BuildConfig
from llamadeploy.manifest import Manifest
from llamadeploy.roles.release.facts import ReleaseRecord

SPECS = Path(__file__).resolve().parents[1] / "operations"
CASE_KEYS = {"args", "kwargs", "global_arguments", "facts", "commands", "noop_description", "exception",
             "description", "executing", "fleet", "host"}

#: (op path, argument name) -> converter from the JSON value to what the operation takes
ARG_ADAPTERS: dict[tuple[str, str], Callable[[Any], Any]] = {
    # not validated: the op must quote even what validation would have refused (defense in depth)
    ("roles.build.operations.build_release", "build"): lambda v: BuildConfig.model_construct(**v),
    ("atomic.put", "src"): StringIO,
    ("atomic.verified_file", "present"): lambda v: None if v is None else HashState(**v),
    ("roles.model.operations.hub_download", "present"): lambda v: None if v is None else HashState(**v),
    # what the workers' own operations said when the check executes: {"worker": true|false}
    ("roles.rpc.operations.workers_checked", "ready"): lambda v: (lambda: v),
}


def _nonce_digest(call: dict[str, Any], content: str | None) -> str | None:
    """What ``atomic.NonceDigest`` prints for a host file holding ``content`` (None: no file)."""
    import hashlib

    return None if content is None else hashlib.sha256((call["nonce"] + content).encode()).hexdigest()


#: fact name -> (random arguments left out of the table key, answer from (call, table value))
SIMULATED_FACTS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any], Any], Any]]] = {
    "atomic.NonceDigest": (("nonce",), _nonce_digest),
    # a dataclass fact: JSON gives its fields ({"sha256": ..., "recorded": true}) or null
    "atomic.VerifiedSha256": ((), lambda _call, v: None if v is None else HashState(**v)),
    # [{"id", "activated", "manifest": {...}, "image_id"?}] -> ReleaseRecord with a parsed Manifest
    "roles.release.facts.ReleaseRecords": ((), lambda _call, v: [
        ReleaseRecord(r["id"], r["activated"], Manifest.model_validate(r["manifest"]), r.get("image_id")) for r in v]),
}


def fact_name(fact_cls: type) -> str:
    """``pyinfra.facts.files.File`` -> ``files.File``; ``llamadeploy.facts.ServerHelp`` -> ``facts.ServerHelp``."""
    module = fact_cls.__module__
    for prefix in ("pyinfra.facts.", "llamadeploy."):
        module = module.removeprefix(prefix)
    return f"{module}.{fact_cls.__name__}"


class FakeHost:
    """The part of ``pyinfra.api.Host`` an operation body uses: facts, ``noop``, ``name``."""

    def __init__(self, facts: dict[str, Any], name: str = "testhost",
                 global_arguments: dict[str, Any] | None = None, executing: bool = True):
        self.name = name
        self.current_op_global_arguments = global_arguments
        self.data: dict[str, Any] = {}
        self._facts = facts
        self.used: set[tuple[str, str | None]] = set()
        self.noop_description: str | None = None
        #: operations run at execution (pyinfra -y); change detection is a separate stage
        self.state = type("State", (), {"is_executing": executing, "active_hosts": set()})()
        self.inventory = FakeInventory([])
        self.noop_calls = 0

    def noop(self, description: str) -> None:
        self.noop_description = description
        self.noop_calls += 1

    def get_fact(self, fact_cls: type, *args: Any, **kwargs: Any) -> Any:
        key = fact_name(fact_cls)
        if key not in self._facts:
            raise KeyError(f"missing test fact: {key}")
        # like pyinfra.api.facts: global arguments (_sudo, ...) are not fact arguments
        kwargs = {k: v for k, v in kwargs.items() if k not in all_argument_meta}
        if not (args or kwargs):
            self.used.add((key, None))
            return self._facts[key]
        call = getcallargs(fact_cls().command, *args, **kwargs)
        real = getfullargspec(fact_cls.command).args
        for arg in call:
            assert arg in real, f"{arg} is not an argument of {key}.command"
        hidden, simulate = SIMULATED_FACTS.get(key, ((), lambda _call, value: value))
        sub = get_kwargs_str({k: v for k, v in call.items() if k not in hidden})
        table = self._facts[key]
        if not isinstance(table, dict) or sub not in table:
            raise KeyError(f"missing test fact: {key} -> {sub}")
        self.used.add((key, sub))
        return simulate(call, table[sub])

    def unused_facts(self) -> list[str]:
        """Case entries the operation never read: whole facts, or kwargs strings of a fact table."""
        out = []
        for key, value in self._facts.items():
            if (key, None) in self.used:
                continue
            if any(k == key for k, _ in self.used):
                out += [f"{key} -> {sub}" for sub in value if (key, sub) not in self.used]
            else:
                out.append(key)
        return out


class FakeInventory:
    """Hosts by name, in inventory order (what ``host.inventory`` iterates); weak-referenceable."""

    def __init__(self, names: list[str]):
        self.hosts = [type("Host", (), {"name": n})() for n in names]

    def __iter__(self) -> Any:
        return iter(self.hosts)


def register_fleet(host: FakeHost, spec: dict[str, Any]) -> None:
    """The case's ``fleet``: registered for ``host.inventory`` as the transfer role would."""
    from llamadeploy.roles.transfer.fleet import Fleet, Member, register

    spec = dict(spec)
    members = [Member(**m) for m in spec.pop("members")]
    active = spec.pop("active", [m.host for m in members])
    host.inventory = FakeInventory([m.host for m in members])
    host.state.active_hosts = {h for h in host.inventory if h.name in active}
    spec["serving"] = {int(r): set(hosts) for r, hosts in spec.get("serving", {}).items()}
    fleet = Fleet(**spec)
    for m in members:
        register(host.inventory, fleet, m)  # type: ignore[arg-type]


def command_json(command: Any) -> Any:
    """One yielded command as a JSON value (see the module docstring)."""
    if isinstance(command, str):  # pyinfra.api.operation does the same
        command = StringCommand(command.strip())
    if isinstance(command, StringCommand):
        raw, masked = command.get_raw_value(), command.get_masked_value()
        out: Any = raw if raw == masked else {"raw": raw, "masked": masked}
    elif isinstance(command, FileUploadCommand):
        src = command.src
        if isinstance(src, str):
            shown = src
        elif isinstance(src, StringIO | BytesIO):
            value = src.getvalue()
            shown = value.decode() if isinstance(value, bytes) else value
        else:
            shown = repr(src)
        out = ["upload", shown, str(command.dest)]
        if command.remote_temp_filename:  # where an escalating connector stages it
            out.append(str(command.remote_temp_filename))
    elif isinstance(command, FileDownloadCommand):
        out = ["download", str(command.src), str(command.dest)]
    elif isinstance(command, FunctionCommand):
        out = [command.function.__name__, list(command.args), command.kwargs]
    elif hasattr(command, "spec_json"):  # our own PyinfraCommand subclasses
        return command.spec_json()
    else:
        raise TypeError(f"{command!r} is not a pyinfra command")
    if command.connector_arguments:
        out = {"command": out, **command.connector_arguments}
    return out


def load_operation(op_path: str) -> Any:
    module, name = op_path.rsplit(".", 1)
    return getattr(import_module(f"llamadeploy.{module}"), name)


def case_files() -> list[Path]:
    return sorted(SPECS.glob("*/*.json"))


def case_id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def run_case(op_path: str, case: dict[str, Any]) -> None:
    unknown = set(case) - CASE_KEYS
    assert not unknown, f"unknown case keys: {sorted(unknown)}"
    op = load_operation(op_path)
    bound = signature(op._inner).bind(*case.get("args", []), **case.get("kwargs", {}))
    for arg, value in bound.arguments.items():
        adapter = ARG_ADAPTERS.get((op_path, arg))
        if adapter is not None:
            bound.arguments[arg] = adapter(value)

    facts = case.get("facts", {})
    host = FakeHost(facts, name=case.get("host", "testhost"), global_arguments=case.get("global_arguments"),
                    executing=case.get("executing", True))
    if "fleet" in case:
        register_fleet(host, case["fleet"])
    commands: list[Any] = []
    raised: Exception | None = None
    with ctx_host.use(host):
        try:
            for command in op._inner(*bound.args, **bound.kwargs):
                commands.append(command_json(command))
        except Exception as exc:  # compared with the case's "exception" below
            if "exception" not in case:
                raise
            raised = exc

    want = case.get("exception")
    if want is not None:
        assert raised is not None, f"expected {want['name']}, the operation yielded {commands}"
        assert (type(raised).__name__, str(raised)) == (want["name"], want["message"])
        assert commands == case.get("commands", [])
    else:
        assert "commands" in case, "a case without 'exception' must list its 'commands'"
        assert commands == case["commands"]

    if "noop_description" in case:
        assert host.noop_calls == 1, f"host.noop called {host.noop_calls} times"
        assert host.noop_description == case["noop_description"]
    else:
        assert host.noop_calls == 0, f"unexpected host.noop({host.noop_description!r})"
        assert commands or raised, "an operation that yields nothing must say why: give noop_description"

    unused = host.unused_facts()
    assert not unused, f"facts the operation never asked for: {unused}"


@pytest.mark.parametrize("path", case_files(), ids=case_id)
def test_operation_case(path: Path) -> None:
    run_case(path.parent.name, json.loads(path.read_text(encoding="utf-8")))


def discovered_operations() -> set[str]:
    """Every ``@operation`` defined in the package (roles included), found by walking its modules."""
    import importlib
    import inspect
    import pkgutil

    import llamadeploy
    import llamadeploy.roles

    modules = [*pkgutil.walk_packages(llamadeploy.__path__, "llamadeploy."),
               *pkgutil.walk_packages(llamadeploy.roles.__path__, "llamadeploy.roles.")]  # mapped folder
    found = set()
    for info in modules:
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            inner = getattr(obj, "_inner", None)  # operations are generators; deploys are not
            if inspect.isgeneratorfunction(inner) and inner.__module__ == info.name:
                found.add(f"{info.name.removeprefix('llamadeploy.')}.{name}")
    return found


def test_every_operation_has_cases() -> None:
    """Each custom operation has a spec folder (found, not listed: a new operation without specs
    fails here), and each spec folder names a real operation."""
    folders = {p.name for p in SPECS.iterdir() if p.is_dir()}
    operations = discovered_operations()
    assert len(operations) >= 12, operations
    assert folders == operations, (sorted(operations - folders), sorted(folders - operations))


def test_hostile_commit_stays_one_shell_word() -> None:
    """The expected build command (which the case above proves is the real one) keeps a
    hostile ``commit`` inside single shell words: in the -D option and the BUILD-INFO line."""
    case = json.loads((SPECS / "roles.build.operations.build_release" / "hostile_commit.json").read_text())
    commit = case["args"][0]["commit"]
    assert commit == "x'; touch /tmp/pwned; echo '"
    words = shlex.split(case["commands"][-1])
    assert f"-DLLAMA_BUILD_COMMIT={commit}" in words
    assert f"LLAMA_BUILD_COMMIT={commit}" in words
    assert "touch" not in words and "/tmp/pwned;" not in words
