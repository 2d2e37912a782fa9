"""Unit tests for chat_template.py against llama.cpp b11434's real ``--help`` text.

HELP_EXCERPT is lines 664-701 of ``llama-server --help`` at b11434 (recorded output,
identical to what common/arg.cpp's ``--chat-template``/``--chat-template-file`` entries
and ``break_str_into_lines`` produce: 40-space indent, 70-column wrap).
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from llamadeploy.chat_template import (
    ARCH_TEMPLATES,
    TEMPLATE_MARKERS,
    VOCAB_ARCH_TEMPLATES,
    builtin_template_for,
    parse_builtin_templates,
    server_args,
    template_problem,
)

HELP_EXCERPT = """\
--chat-template JINJA_TEMPLATE          set custom jinja chat template (default: template taken from model's
                                        metadata)
                                        if suffix/prefix are specified, template will be disabled
                                        only commonly used templates are accepted (unless --jinja is set
                                        before this flag):
                                        list of built-in templates:
                                        bailing, bailing-think, bailing2, chatglm3, chatglm4, chatml,
                                        command-r, deepseek, deepseek-ocr, deepseek2, deepseek3, exaone-moe,
                                        exaone3, exaone4, falcon3, gemma, gigachat, glmedge, gpt-oss, granite,
                                        granite-4.0, granite-4.1, grok-2, hunyuan-dense, hunyuan-moe,
                                        hunyuan-vl, kimi-k2, llama2, llama2-sys, llama2-sys-bos,
                                        llama2-sys-strip, llama3, llama4, megrez, minicpm, mistral-v1,
                                        mistral-v3, mistral-v3-tekken, mistral-v7, mistral-v7-tekken, monarch,
                                        openchat, orion, pangu-embedded, phi3, phi4, rwkv-world, seed_oss,
                                        smolvlm, solar-open, vicuna, vicuna-orca, yandex, zephyr
                                        (env: LLAMA_ARG_CHAT_TEMPLATE)
--chat-template-file JINJA_TEMPLATE_FILE
                                        set custom jinja chat template file (default: template taken from
                                        model's metadata)
                                        if suffix/prefix are specified, template will be disabled
                                        only commonly used templates are accepted (unless --jinja is set
                                        before this flag):
                                        list of built-in templates:
                                        bailing, bailing-think, bailing2, chatglm3, chatglm4, chatml,
                                        command-r, deepseek, deepseek-ocr, deepseek2, deepseek3, exaone-moe,
                                        exaone3, exaone4, falcon3, gemma, gigachat, glmedge, gpt-oss, granite,
                                        granite-4.0, granite-4.1, grok-2, hunyuan-dense, hunyuan-moe,
                                        hunyuan-vl, kimi-k2, llama2, llama2-sys, llama2-sys-bos,
                                        llama2-sys-strip, llama3, llama4, megrez, minicpm, mistral-v1,
                                        mistral-v3, mistral-v3-tekken, mistral-v7, mistral-v7-tekken, monarch,
                                        openchat, orion, pangu-embedded, phi3, phi4, rwkv-world, seed_oss,
                                        smolvlm, solar-open, vicuna, vicuna-orca, yandex, zephyr
                                        (env: LLAMA_ARG_CHAT_TEMPLATE_FILE)
--skip-chat-parsing, --no-skip-chat-parsing
                                        force a pure content parser, even if a Jinja template is specified;
                                        model will output everything in the content section, including any
                                        reasoning and/or tool calls (default: disabled)
                                        (env: LLAMA_ARG_SKIP_CHAT_PARSING)
"""

#: keys of LLM_CHAT_TEMPLATES in src/llama-chat.cpp at b11434
B11434_BUILTINS = frozenset("""
    bailing bailing-think bailing2 chatglm3 chatglm4 chatml command-r deepseek
    deepseek-ocr deepseek2 deepseek3 exaone-moe exaone3 exaone4 falcon3 gemma gigachat
    glmedge gpt-oss granite granite-4.0 granite-4.1 grok-2 hunyuan-dense hunyuan-moe
    hunyuan-vl kimi-k2 llama2 llama2-sys llama2-sys-bos llama2-sys-strip llama3 llama4
    megrez minicpm mistral-v1 mistral-v3 mistral-v3-tekken mistral-v7 mistral-v7-tekken
    monarch openchat orion pangu-embedded phi3 phi4 rwkv-world seed_oss smolvlm
    solar-open vicuna vicuna-orca yandex zephyr
""".split())

LINES = HELP_EXCERPT.splitlines()


# --- parse_builtin_templates -------------------------------------------------------

def test_parses_every_b11434_name_across_wrapped_lines():
    assert parse_builtin_templates(LINES) == B11434_BUILTINS
    assert len(B11434_BUILTINS) == 54


def test_stops_at_the_env_line_and_ignores_the_file_option_repeat():
    names = parse_builtin_templates(LINES)
    assert not any("LLAMA_ARG" in n or "env" in n for n in names)
    assert "JINJA_TEMPLATE_FILE" not in names


def test_stripped_lines_parse_the_same():
    assert parse_builtin_templates([l.strip() for l in LINES]) == B11434_BUILTINS


def test_other_wrap_widths_parse_the_same():
    joined = ", ".join(sorted(B11434_BUILTINS))
    for width in (20, 40, 70, 200, 10_000):
        wrapped = textwrap.wrap(joined, width, break_on_hyphens=False, break_long_words=False)
        lines = ["--chat-template JINJA_TEMPLATE          set custom jinja chat template",
                 " " * 40 + "list of built-in templates:",
                 *(" " * 40 + w for w in wrapped),
                 " " * 40 + "(env: LLAMA_ARG_CHAT_TEMPLATE)"]
        assert parse_builtin_templates(lines) == B11434_BUILTINS, width


def test_names_on_the_heading_line():
    lines = ["list of built-in templates: chatml, gemma,", "    llama3", "(env: X)"]
    assert parse_builtin_templates(lines) == {"chatml", "gemma", "llama3"}


def test_no_heading_gives_empty_set():
    assert parse_builtin_templates([]) == frozenset()
    assert parse_builtin_templates(["bash: llama-server: not found"]) == frozenset()
    assert parse_builtin_templates([l for l in LINES if "list of built-in" not in l]) == frozenset()


def test_list_not_followed_by_prose():
    lines = ["list of built-in templates:", "chatml, gemma", "example: foo, bar"]
    assert parse_builtin_templates(lines) == {"chatml", "gemma"}


PROJECT_HELP = Path(__file__).parent / "data" / "llama-server-b11434-help.txt"


@pytest.mark.skipif(not PROJECT_HELP.exists(), reason="full recorded help not present")
def test_full_recorded_help():
    assert parse_builtin_templates(PROJECT_HELP.read_text().splitlines()) == B11434_BUILTINS


# --- tables -------------------------------------------------------------------------

def test_every_table_name_is_a_b11434_builtin():
    assert set(ARCH_TEMPLATES.values()) <= B11434_BUILTINS
    assert {n for ns in VOCAB_ARCH_TEMPLATES.values() for n in ns} <= B11434_BUILTINS
    assert set(TEMPLATE_MARKERS) <= B11434_BUILTINS


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3", "gemma3n"])
def test_gemma_family(arch):
    assert builtin_template_for(arch, False, B11434_BUILTINS) == "gemma"


@pytest.mark.parametrize("arch", ["gemma4", "gemma-embedding", "llama", "deepseek2", "chatglm", "mistral3", "bert", ""])
def test_ambiguous_or_unknown_architectures_get_nothing(arch):
    assert builtin_template_for(arch, False, B11434_BUILTINS) is None


@pytest.mark.parametrize("arch,name", [("qwen2", "chatml"), ("qwen3moe", "chatml"), ("phi3", "phi3"),
                                       ("llama4", "llama4"), ("gpt-oss", "gpt-oss"), ("exaone", "exaone3"),
                                       ("granitehybrid", "granite-4.0"), ("hunyuan_vl", "hunyuan-vl")])
def test_other_mappings(arch, name):
    assert builtin_template_for(arch, False, B11434_BUILTINS) == name


# --- builtin_template_for ------------------------------------------------------------

def test_own_template_wins():
    assert builtin_template_for("gemma3", True, B11434_BUILTINS) is None


def test_name_must_be_accepted_by_the_binary():
    assert builtin_template_for("gemma3", False, B11434_BUILTINS - {"gemma"}) is None
    assert builtin_template_for("gemma3", False, frozenset()) is None  # no --help: never guess


GEMMA_VOCAB = {"<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "hello"}
LLAMA3_VOCAB = {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}
LLAMA2_VOCAB = {"<s>", "</s>", "<unk>", "▁hello"}
PHI3_VOCAB = {"<|user|>", "<|assistant|>", "<|end|>", "<|system|>"}
PHI4_VOCAB = {"<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|endoftext|>"}


def test_vocab_confirms_markers():
    assert builtin_template_for("gemma3", False, B11434_BUILTINS, GEMMA_VOCAB) == "gemma"
    assert builtin_template_for("gemma3", False, B11434_BUILTINS, ["<start_of_turn>", "<end_of_turn>"]) == "gemma"
    assert builtin_template_for("gemma3", False, B11434_BUILTINS, {"<start_of_turn>"}) is None
    assert builtin_template_for("qwen2", False, B11434_BUILTINS, GEMMA_VOCAB) is None


def test_llama_only_from_vocab():
    assert builtin_template_for("llama", False, B11434_BUILTINS, LLAMA3_VOCAB) == "llama3"
    assert builtin_template_for("llama", False, B11434_BUILTINS, LLAMA2_VOCAB) is None
    assert builtin_template_for("llama", False, B11434_BUILTINS) is None
    assert builtin_template_for("llama", True, B11434_BUILTINS, LLAMA3_VOCAB) is None


def test_phi3_arch_phi4_vocab():
    assert builtin_template_for("phi3", False, B11434_BUILTINS, PHI3_VOCAB) == "phi3"
    assert builtin_template_for("phi3", False, B11434_BUILTINS, PHI4_VOCAB) == "phi4"
    assert builtin_template_for("phi3", False, B11434_BUILTINS - {"phi4"}, PHI4_VOCAB) is None


# --- server_args ----------------------------------------------------------------------

def test_server_args_disable_jinja():
    assert server_args("gemma") == ["--no-jinja", "--chat-template", "gemma"]
    assert server_args(None) == []


#: lines 632-633 of the same recorded help (common/arg.cpp: {"--jinja"}, {"--no-jinja"})
JINJA_EXCERPT = """\
--jinja, --no-jinja                     whether to use jinja template engine for chat (default: enabled)
                                        (env: LLAMA_ARG_JINJA)
"""


def test_rendered_flags_exist_in_b11434_help():
    options = [l.split("  ")[0] for l in (JINJA_EXCERPT + HELP_EXCERPT).splitlines() if l.startswith("-")]
    assert "--jinja, --no-jinja" in options
    assert "--chat-template JINJA_TEMPLATE" in options
    assert "(default: enabled)" in JINJA_EXCERPT  # jinja is on unless --no-jinja


@pytest.mark.skipif(not PROJECT_HELP.exists(), reason="full recorded help not present")
def test_excerpts_are_verbatim_from_the_recorded_help():
    full = PROJECT_HELP.read_text()
    assert HELP_EXCERPT in full and JINJA_EXCERPT in full


# --- the real test model (optional) -----------------------------------------------------

MODEL = Path(os.environ.get("GEMMA_GGUF", "/var/cache/llamactl-ci/models/gemma-3-270m-q4_k_m.gguf"))


@pytest.mark.skipif(not MODEL.exists(), reason="test GGUF not present")
def test_real_gemma3_270m_gguf():
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(MODEL), "r")
    has_template = reader.fields.get("tokenizer.chat_template") is not None
    arch = reader.fields["general.architecture"].contents()
    vocab = reader.fields["tokenizer.ggml.tokens"].contents()
    assert (has_template, arch) == (False, "gemma3")
    assert builtin_template_for(arch, has_template, B11434_BUILTINS, vocab) == "gemma"


def test_template_problem_names_the_missing_builtin():
    args = ["--port", "8080", *server_args("gemma")]
    assert template_problem(args, B11434_BUILTINS, "/bin/x") is None
    msg = template_problem(args, frozenset({"chatml"}), "/bin/x")
    assert msg == "/bin/x has no built-in chat template 'gemma' (it has: chatml)"
    # a Jinja source (no --no-jinja) is not a built-in name: not ours to check
    assert template_problem(["--chat-template", "{{ x }}"], frozenset(), "/bin/x") is None


def test_unknown_accepted_list_defers_the_check():
    assert builtin_template_for("gemma3", False, None) == "gemma"
