"""Config model: defaults, deep merge of data layers, and one clear message per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamadeploy.config import BuildConfig, HostConfig
from llamadeploy.hostdata import ConfigError, parse_config, raw_settings, validate_inventory

MODEL = {"llama_model": {"path": "/models/m.gguf"}}
#: these tests are about other fields: the open-without-key refusal has its own tests
OPEN = {"llama_server": {"allow_unauthenticated": True}}


def problems(**data) -> list[str]:
    cfg, errs = parse_config("h1", [MODEL, OPEN, data])
    return errs


def test_defaults():
    cfg, errs = parse_config("h1", [MODEL, OPEN])
    assert errs == []
    assert cfg.mode == "native"
    assert cfg.server.port == 8080 and cfg.server.gpu_layers == 0 and cfg.server.threads is None
    assert cfg.model.source == "path" and cfg.model_dir == "/var/lib/llama-server/models"
    assert cfg.current_link == "/opt/llama.cpp/current"


def test_layers_deep_merge_most_specific_wins():
    group = {"llama_server": {"port": 9000, "ctx_size": 4096}, "other": 1}
    host = {"llama_server": {"port": 9001}}
    merged = raw_settings([MODEL, group, host])
    assert merged["server"] == {"port": 9001, "ctx_size": 4096}
    assert "other" not in merged


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"llama_sever": {}}, "host h1: llama_sever: unknown setting (allowed: llama_mode, llama_build"),
        ({"llama_server": {"prot": 1}}, "host h1: llama_server.prot: unknown setting (allowed in llama_server: host, port"),
        ({"llama_server": {"port": 0}}, "host h1: llama_server.port = 0: Input should be greater than or equal to 1"),
        ({"llama_server": {"port": 65536}}, "host h1: llama_server.port = 65536: Input should be less than or equal to 65535"),
        ({"llama_server": {"port": "80"}}, "host h1: llama_server.port = '80': Input should be a valid integer"),
        ({"llama_server": {"threads": -1}}, "host h1: llama_server.threads = -1: Input should be greater than or equal to 1"),
        ({"llama_mode": "k8s"}, "host h1: llama_mode = 'k8s': Input should be 'native'"),
        ({"llama_server": {"host": "example.org"}}, "host h1: llama_server.host = 'example.org': Value error, must be an IP address"),
        ({"llama_server": {"load_mode": "lock"}}, "host h1: llama_server.load_mode = 'lock': Input should be 'auto', 'none', 'mmap', 'mlock' or 'mmap+mlock'"),
        ({"llama_server": {"api_key": "short"}}, "host h1: llama_server.api_key = <hidden>: Value error, must be 16-512"),
        ({"llama_limits": {"memory": "8GB"}}, "host h1: llama_limits.memory = '8GB': String should match pattern"),
        ({"llama_limits": {"cpus": 0}}, "host h1: llama_limits.cpus = 0: Input should be greater than 0"),
        ({"llama_build": {"source": "tarball"}}, "host h1: llama_build = "),
        ({"llama_build": {"cmake_args": {"ggml_avx": "ON"}}}, "host h1: llama_build.cmake_args = {'ggml_avx': 'ON'}: Value error, cmake option 'ggml_avx'"),
        ({"llama_model": {"path": "/m.bin"}}, "host h1: llama_model.path = '/m.bin': Value error, must be a .gguf file"),
        ({"llama_model": {"path": "/m.gguf", "sha256": "ABC"}}, "host h1: llama_model.sha256 = 'ABC': String should match pattern"),
        ({"llama_service": {"prefix": "relative/path"}}, "host h1: llama_service.prefix = 'relative/path'"),
        ({"llama_service": {"user": "Root User"}}, "host h1: llama_service.user = 'Root User'"),
        ({"llama_health": {"timeout": 0}}, "host h1: llama_health.timeout = 0"),
    ],
)
def test_bad_value_named_with_host_field_value_and_rule(data, expected):
    errs = problems(**data)
    assert len(errs) == 1, errs
    assert errs[0].startswith(expected), errs[0]


def test_secret_value_never_in_message():
    errs = problems(llama_server={"api_key": "has a space in it!!"})
    assert errs and "has a space" not in errs[0]


def test_every_problem_reported_at_once():
    errs = problems(llama_server={"port": -1, "threads": 0, "bogus": 1})
    assert len(errs) == 3


def test_model_defaults_to_catalog_tiny_model():
    cfg, errs = parse_config("h1", [OPEN])
    assert errs == []
    assert cfg.model.hub_target() == ("unsloth/gemma-3-270m-it-GGUF", "gemma-3-270m-it-Q4_K_M.gguf", None)
    assert cfg.model.distribution == "controller" and cfg.model.revision == "main"


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"catalog": "llama-9"}, "llama_model.catalog = 'llama-9': Value error, unknown catalog model (known: gemma-3-270m, gemma-2-2b-it, phi-3-mini, qwen2.5-3b)"),
        ({"path": "/m.gguf", "repo_id": "a/b", "filename": "x.gguf"}, "llama_model = "),
        ({"repo_id": "a/b"}, "with repo_id give exactly one of filename, quant"),
        ({"repo_id": "a/b", "filename": "x.gguf", "quant": "Q4_K_M"}, "with repo_id give exactly one of filename, quant"),
        ({"repo_id": "not a repo", "quant": "Q4_K_M"}, "llama_model.repo_id = 'not a repo'"),
        ({"path": "/m.gguf", "distribution": "host"}, "distribution 'host' needs a Hub model"),
        ({"catalog": "qwen2.5-3b", "distribution": "peer"}, "llama_model.distribution = 'peer'"),
        ({"catalog": "qwen2.5-3b", "hf_endpoint": "ftp://mirror"}, "llama_model.hf_endpoint = 'ftp://mirror'"),
    ],
)
def test_bad_model_spec(model, expected):
    cfg, errs = parse_config("h1", [{"llama_model": model}])
    assert len(errs) == 1 and expected in errs[0], errs


def test_release_key_changes_with_flags_only():
    local = {"host": "127.0.0.1"}
    a = HostConfig.model_validate({"model": {"path": "/m.gguf"}, "server": local})
    b = HostConfig.model_validate({"model": {"path": "/x.gguf"}, "server": {**local, "port": 1}})
    c = HostConfig.model_validate({"model": {"path": "/m.gguf"}, "server": local, "build": {"native": False}})
    d = HostConfig.model_validate({"model": {"path": "/m.gguf"}, "server": local, "build": {"version": "b11435"}})
    assert a.build.release_key() == b.build.release_key()
    assert len({a.build.release_key(), c.build.release_key(), d.build.release_key()}) == 3
    assert a.build.release_key().startswith("b11434-")
    assert a.build.cmake_options()["LLAMA_BUILD_NUMBER"] == "11434"


class FakeHost:
    """Just enough of a pyinfra Host for validate_inventory: a name and data layers."""

    def __init__(self, name, data):
        self.name = name
        self.data = type("D", (), {"datas": (data, OPEN)})()  # host layer first, as pyinfra orders them


def test_validate_inventory_collects_all_hosts(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    good = FakeHost("a", {"llama_model": {"path": str(model)}})
    bad1 = FakeHost("b", {"llama_model": {"path": str(model)}, "llama_server": {"port": 0}})
    bad2 = FakeHost("c", {"llama_model": {"path": str(tmp_path / "missing.gguf")}})
    with pytest.raises(ConfigError) as exc:
        validate_inventory([good, bad1, bad2])
    text = str(exc.value)
    assert "nothing was changed on any host" in text
    assert "host b: llama_server.port = 0" in text
    assert "host c: llama_model.path" in text and "no such file on the controller" in text
    assert "host a" not in text
    assert set(validate_inventory([good])) == {"a"}


def test_pinned_sha256_checked_against_controller_file(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    host = FakeHost("a", {"llama_model": {"path": str(model), "sha256": "0" * 64}})
    with pytest.raises(ConfigError, match="has sha256 "):
        validate_inventory([host])


def validated(name: str, key_name: str) -> dict:
    """An inventory under ``inventory/`` loaded with pyinfra's own loader and validated, its key
    made as its comment says (in a subprocess: pyinfra's CLI package monkey-patches the process)."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    code = """
import json, sys
from pyinfra.api import Config, State
from pyinfra.context import ctx_state
from pyinfra_cli.inventory import make_inventory
from llamadeploy.hostdata import validate_inventory
state = State(); ctx_state.set(state)
inv = make_inventory(sys.argv[1], cwd=".")
state.init(inv, Config())
print(json.dumps({k: v.model_dump(mode="json") for k, v in validate_inventory(inv).items()}))
"""
    key = root / "secrets" / key_name
    made = not key.exists()
    try:
        if made:  # the site's key, as the example's comment says to make it
            subprocess.run([sys.executable, "-m", "llamadeploy.cli", "key", "new", str(key)], check=True,
                           capture_output=True, timeout=60)
        out = subprocess.run([sys.executable, "-c", code, f"inventory/{name}"], cwd=root, capture_output=True,
                             text=True, check=True, timeout=120)
    finally:
        if made:
            key.unlink(missing_ok=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_example_site_inventory_is_valid():
    configs = validated("example_site.py", "example-site-api-key")
    assert all(c["server"]["api_key"] == "**********" for c in configs.values())  # read from the file, hidden
    assert set(configs) == {"llm-01.example.internal", "llm-02.example.internal", "llm-10.example.internal"}
    assert configs["llm-02.example.internal"]["server"]["port"] == 8081
    assert configs["llm-01.example.internal"]["limits"]["memory"] == "8G"
    assert configs["llm-10.example.internal"]["model"]["catalog"] == "qwen2.5-3b"


def test_open_without_key_is_refused_with_the_fix():
    """The exposure that left many Ollama servers open: 0.0.0.0 and no key is refused by default."""
    (msg,) = parse_config("h1", [MODEL])[1]
    assert msg.startswith("host h1: llama_server.host = '0.0.0.0': binding a non-loopback address without")
    assert "llamadeploy key new FILE" in msg and "allow_unauthenticated" in msg
    assert parse_config("h1", [MODEL, {"llama_server": {"host": "127.0.0.1"}}])[1] == []
    assert parse_config("h1", [MODEL, {"llama_server": {"api_key": "k" * 20}}])[1] == []


HOSTILE = ["x'; touch /tmp/pwned; echo '", "$(touch /tmp/pwned)", "`id`", "a;b", "a\nb", "-rf", "--upload-pack=x", "../x"]


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize(
    "section,field",
    [("llama_build", "commit"), ("llama_build", "git_url"), ("llama_build", "tarball_subdir"),
     ("llama_model", "revision"), ("llama_model", "alias"), ("llama_service", "data_dir"),
     ("llama_service", "prefix"), ("llama_service", "user"), ("llama_service", "name"),
     ("llama_docker", "project_dir"), ("llama_server", "chat_template")],
)
def test_hostile_strings_refused(section, field, value):
    """Quotes, $(), backticks, ;, newlines, a leading - and .. never pass a field that names something."""
    errs = problems(**{section: {field: value}})
    assert len(errs) == 1 and errs[0].startswith(f"host h1: {section}.{field} = "), errs


@pytest.mark.parametrize("value", ["$(id)", "x'y", "a`id`", "a\nb", 'a"b'])
def test_hostile_cmake_values_refused(value):
    """Spaces and ';' (CMake lists, flag strings) pass: the value is one quoted shell word."""
    errs = problems(llama_build={"cmake_args": {"GGML_X": value}})
    assert len(errs) == 1 and "llama_build.cmake_args.GGML_X = " in errs[0], errs


@pytest.mark.parametrize(
    "data,expected",
    [
        ({"llama_service": {"data_dir": "/tmp/llama"}}, "llama_service.data_dir = '/tmp/llama': Value error, must not be under /tmp"),
        ({"llama_service": {"config_dir": "/home/ops/llama"}}, "must not be under /home"),
        ({"llama_service": {"prefix": "/opt//llama"}}, "must be normalized"),
        ({"llama_service": {"user": "root"}}, "llama_service.user = 'root': Value error, must be an unprivileged account"),
        ({"llama_limits": {"memory": "4G", "memory_reserved": "8G"}},
         "llama_limits.memory_reserved = '8G': a reservation cannot exceed its limit (memory = '4G')"),
        ({"llama_limits": {"cpus": 2.0, "cpus_reserved": 4.0}}, "llama_limits.cpus_reserved = 4.0: a reservation cannot exceed"),
        ({"llama_mode": "docker", "llama_server": {"load_mode": "mmap+mlock"}},
         "llama_server.load_mode = 'mmap+mlock': docker mode cannot lock memory"),
        ({"llama_model": {"repo_id": "a/b", "filename": "../../etc/passwd"}}, "llama_model.filename = '../../etc/passwd'"),
    ],
)
def test_unsafe_paths_accounts_limits_and_modes(data, expected):
    errs = problems(**data)
    assert len(errs) == 1 and expected in errs[0], errs


def test_key_file_must_be_private(tmp_path):
    key = tmp_path / "k"
    key.write_text("sk-" + "a" * 30 + "\n")
    key.chmod(0o644)
    (msg,) = problems(llama_server={"api_key_file": str(key)})
    assert msg == f"host h1: llama_server.api_key_file = {str(key)!r}: mode 644 lets others read the key; chmod 600 {key}"
    assert "a" * 30 not in msg
    key.chmod(0o600)
    cfg, errs = parse_config("h1", [MODEL, {"llama_server": {"api_key_file": str(key)}}])
    assert errs == [] and cfg.server.api_key.get_secret_value() == "sk-" + "a" * 30
    (missing,) = problems(llama_server={"api_key_file": str(tmp_path / "nope")})
    assert "No such file or directory on the controller (create it: llamadeploy key new" in missing


@pytest.mark.parametrize("data,expected", [
    ({"llama_service": {"prefix": "/opt"}}, "llama_service.prefix = '/opt': Value error, must be a directory of the service's own"),
    ({"llama_service": {"data_dir": "/var/lib"}}, "llama_service.data_dir = '/var/lib': Value error, must be a directory"),
    ({"llama_service": {"prefix": "/opt/llama", "data_dir": "/opt/llama/data"}},
     "llama_service.data_dir = '/opt/llama/data': must not be inside or equal to llama_service.prefix"),
    ({"llama_docker": {"project_dir": "/opt/llama.cpp/compose"}}, "llama_docker.project_dir = '/opt/llama.cpp/compose'"),
    ({"llama_server": {"extra_args": ["--api-key", "sk-123"]}},
     "llama_server.extra_args = ['--api-key', '<hidden>']: Value error, --api-key would put a secret on the command line"),
    ({"llama_server": {"extra_args": ["--threads", "2", "--api-key=sk-123"]}},
     "llama_server.extra_args = ['--threads', '2', '--api-key=<hidden>']"),
    ({"llama_server": {"extra_args": ["-hft", "hf_sk-123"]}}, "use llama_model.hf_token_file"),
    ({"llama_server": {"extra_args": ["--api-key sk-123"]}}, "['--api-key <hidden>']: Value error, --api-key would"),
    ({"llama_server": {"extra_args": ("--api-key", "sk-123")}}, "llama_server.extra_args = ['--api-key', '<hidden>']"),
    ({"llama_server": {"extra_args": "--api-key sk-123"}}, "llama_server.extra_args = <hidden>"),
    ({"llama_server": "sk-pasted-key-123456"}, "llama_server = <a str>"),
])
def test_uninstall_safe_paths_and_no_secret_on_command_lines(data, expected):
    """Refused, and the refusal never repeats the secret it refuses."""
    errs = problems(**data)
    assert len(errs) == 1 and expected in errs[0], errs
    assert "sk-" not in errs[0]


def test_legitimate_values_pass():
    assert problems(llama_build={"cmake_args": {"CMAKE_CUDA_ARCHITECTURES": "86;89",
                                                 "CMAKE_CXX_FLAGS": "-O3 -march=znver4"}}) == []
    assert problems(llama_build={"git_url": "http://mirror.internal:8080/llama.cpp.git"}) == []
    assert problems(llama_server={"host": "::1"}) == []


def test_fanout_port_must_not_be_the_servers():
    errs = problems(llama_transfer={"mode": "fanout", "port": 8080})
    assert len(errs) == 1 and "h1" in errs[0] and "transfer.port" in errs[0] and "8080" in errs[0], errs
    assert "llama_server.port" in errs[0]
    assert problems(llama_transfer={"mode": "fanout", "port": 8090}) == []
    assert problems(llama_transfer={"mode": "direct", "port": 8080}) == []  # no fence, no clash


def test_fanout_fence_lists_only_the_fleet():
    """The fence: the run's IPv4 and IPv6 addresses accepted, the port dropped for the rest,
    declared-then-deleted so that loading it replaces an older table whole."""
    from llamadeploy.roles.transfer.fleet import Fleet, Member

    f = Fleet("k", "m", "/m", "0" * 64, 8090, 2, 60, unit="llamadeploy-peer-abcd1234.service")
    for i, addr in enumerate(["10.0.0.2", "fd00::7", "10.0.0.1"]):
        f.members[f"h{i}"] = Member(f"h{i}", addr, "/d", "/s", False)
    rules = f.fence_rules()
    assert rules.splitlines()[:3] == ["table inet llamadeploy_peer_abcd1234 {}",
                                      "delete table inet llamadeploy_peer_abcd1234",
                                      "table inet llamadeploy_peer_abcd1234 {"]
    # the deploy's mark: a run's cleanup removes only tables carrying it (roles/firewall MARK)
    assert rules.splitlines()[3] == '  comment "llamadeploy fan-out 8090"'
    assert "grep -q 'comment \"llamadeploy ' && nft delete table inet \"$t\"" in f.stop_command("h0")
    assert "ip saddr { 10.0.0.1, 10.0.0.2 } tcp dport 8090 accept" in rules
    assert "ip6 saddr { fd00::7 } tcp dport 8090 accept" in rules
    assert rules.index("accept") < rules.index("tcp dport 8090 drop")


def test_rpc_settings_are_checked_per_field():
    errs = problems(llama_role="rpc_worker", llama_mode="docker")
    assert len(errs) == 1 and "'docker'" in errs[0] and "RPC worker" in errs[0], errs
    errs = problems(llama_rpc={"workers_group": "w"}, llama_server={"gpu_layers": 4, "allow_unauthenticated": True})
    assert len(errs) == 1 and "server.gpu_layers" in errs[0] and "llama_rpc.split" in errs[0], errs
    assert problems(llama_rpc={"workers_group": "w", "split": [6, 6, 6]}) == []
    assert problems(llama_rpc={"port": 80}) != []  # below 1024: refused


def test_cuda_builds_are_releases_of_their_own():
    cpu = BuildConfig.model_validate({})
    cuda = BuildConfig.model_validate({"backend": "cuda"})
    pinned = BuildConfig.model_validate({"backend": "cuda", "cuda_architectures": "80;89"})
    assert "GGML_CUDA" not in cpu.cmake_options()
    assert cuda.cmake_options()["GGML_CUDA"] == "ON" and "CMAKE_CUDA_ARCHITECTURES" not in cuda.cmake_options()
    assert pinned.cmake_options()["CMAKE_CUDA_ARCHITECTURES"] == "80;89"
    assert len({cpu.release_key(), cuda.release_key(), pinned.release_key()}) == 3


def test_gpu_settings_are_refused_where_they_cannot_work():
    errs = problems(llama_server={"gpu_layers": 20, "allow_unauthenticated": True})
    assert len(errs) == 1 and "llama_server.gpu_layers = 20" in errs[0] and "llama_build.backend 'cuda'" in errs[0], errs
    errs = problems(llama_role="rpc_worker", llama_build={"backend": "cuda"})
    assert any("llama_build.backend" in e and "CPU release" in e for e in errs), errs
    errs = problems(llama_build={"backend": "cuda", "cuda_architectures": "sm_89"})
    assert any("llama_build.cuda_architectures" in e for e in errs), errs


def test_rag_inventory_is_valid():
    """The RAG example: three models of three kinds on each host, one address."""
    configs = validated("rag.py", "rag-api-key")
    assert set(configs) == {"rag-01.example.internal", "rag-02.example.internal"}
    models = configs["rag-01.example.internal"]["models"]
    assert [(m["alias"], m["kind"], m["load"]) for m in models] == [
        ("chat", "chat", "startup"), ("embed", "embedding", "on_demand"), ("rerank", "rerank", "on_demand")]
