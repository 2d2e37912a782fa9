"""Pick llama-server's built-in chat template for a GGUF that carries none.

Why this exists
---------------
A GGUF without a ``tokenizer.chat_template`` key (typically a *base* model, e.g.
Gemma 3 270M) makes llama-server fall back to ChatML: ``common_chat_templates_init``
(common/chat.cpp, b11434) substitutes ``CHATML_TEMPLATE_SRC`` when the model has no
template. A Gemma vocabulary has no ``<|im_start|>``/``<|im_end|>`` tokens, so those
markers are fed as plain text, the model never emits its end-of-generation token
(``<end_of_turn>``) and replies run on into ``<|im_end|>\\n<|im_start|>user ...``.

llama-server ships hand-written C++ renderers for common formats
(``LLM_CHAT_TEMPLATES`` in src/llama-chat.cpp) selectable by name with
``--chat-template NAME``. We choose one from the GGUF's ``general.architecture``,
but only a name that the *installed* binary lists in its ``--help`` (names come and
go between releases), and we let the caller record the choice in the manifest.

Jinja caveat (b11434)
---------------------
``--jinja`` is on by default for llama-server (``common_params::use_jinja = true``).
With jinja on, the ``--chat-template`` value is compiled as a *Jinja source*, not
looked up as a built-in name; only ``chatml`` is special-cased. ``gemma`` would
therefore be a Jinja program that renders the literal text ``gemma`` for every
request -- and it still passes llama-server's start-up check. A built-in name is
only applied on the legacy path, so the flags must be ``--no-jinja --chat-template
NAME`` (see :func:`server_args`).

Reading the template key from a GGUF (``gguf`` package)::

    from gguf import GGUFReader
    reader = GGUFReader(path, "r")
    has_template = reader.fields.get("tokenizer.chat_template") is not None
    architecture = reader.fields["general.architecture"].contents()
    vocab = reader.fields["tokenizer.ggml.tokens"].contents()   # optional, see below
"""

from __future__ import annotations

import re
from collections.abc import Collection
from itertools import chain

#: The heading llama-server prints before the names, under both ``--chat-template``
#: and ``--chat-template-file`` (``"list of built-in templates:\n%s"`` in common/arg.cpp).
_LIST_HEADING = "list of built-in templates:"

#: One line of the comma-separated name list as ``break_str_into_lines`` wraps it
#: (at spaces, 70 columns, so a name is never split). Names are map keys such as
#: ``granite-4.0`` or ``seed_oss``.
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_LIST_LINE = re.compile(rf"{_NAME}(?:,\s*{_NAME})*,?")


def parse_builtin_templates(help_lines: list[str]) -> frozenset[str]:
    """Names ``--chat-template`` accepts as built-ins, read from ``llama-server --help``.

    The list is generated from ``llama_chat_builtin_templates()`` (the keys of
    ``LLM_CHAT_TEMPLATES``, in map order, joined by ``", "``) and printed after the
    line ``list of built-in templates:``, wrapped to 70 columns and indented 40
    spaces. Every wrapped line but the last ends with a comma, which is how we know
    where the list stops (the next line is ``(env: LLAMA_ARG_CHAT_TEMPLATE)``).

    Indentation and trailing whitespace are ignored, so lines that went through a
    ``strip()`` parse the same. Only the first list is read (``--chat-template-file``
    repeats it verbatim). Returns an empty set when the heading is absent (no
    binary, a release without the list, or output that is not ``--help``).
    """
    names: list[str] = []
    lines = iter(help_lines)
    for line in lines:
        text = line.strip()
        if _LIST_HEADING not in text:
            continue
        # tolerate names printed on the heading line itself
        rest = text.split(_LIST_HEADING, 1)[1].strip()
        for chunk in chain([rest] if rest else [], (raw.strip() for raw in lines)):
            if not _LIST_LINE.fullmatch(chunk):
                break
            names.extend(n.strip() for n in chunk.split(",") if n.strip())
            if not chunk.endswith(","):
                break
        break
    return frozenset(names)


#: ``general.architecture`` -> built-in template, for architectures whose models all
#: share one prompt format. Every value is a key of ``LLM_CHAT_TEMPLATES`` (b11434).
#: Deliberately absent (several formats behind one architecture, or unverified):
#: ``llama`` (Llama 2 ``[INST]``, Llama 3 headers, Mistral 7B/Small, TinyLlama,
#: SmolLM, DeepSeek-LLM, Falcon3, ... -- see :data:`VOCAB_ARCH_TEMPLATES`),
#: ``gemma4`` (``<|turn>``/``<turn|>`` format, not the ``gemma`` built-in),
#: ``gemma-embedding`` (no chat), ``chatglm`` (ChatGLM3 and GLM-4-9B),
#: ``deepseek``/``deepseek2`` (DeepSeek MoE/V2/V3/R1, Kimi K2, ...), ``minicpm``
#: (MiniCPM 1/2 vs ChatML MiniCPM4), ``grok`` (Grok-1 has no chat format),
#: ``mistral3``/``mistral4`` and ``cohere2`` (formats not checked against a built-in).
ARCH_TEMPLATES: dict[str, str] = {
    # Gemma 1, 2, 3 and 3n: <start_of_turn>role\n...<end_of_turn>\n, "model" for the
    # assistant, system prompt folded into the first user turn -- what the built-in does.
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    # Qwen 1/2/2.5/3 (dense, MoE, Next) and SmolLM3 are ChatML models (their vocab has
    # <|im_start|>/<|im_end|>); naming it makes the choice explicit in the manifest.
    "qwen": "chatml",
    "qwen2": "chatml",
    "qwen2moe": "chatml",
    "qwen3": "chatml",
    "qwen3moe": "chatml",
    "qwen3next": "chatml",
    "smollm3": "chatml",
    # Phi-3/3.5 (also the MoE) and Phi-4-mini: <|user|>\n...<|end|>\n<|assistant|>\n.
    # Phi-4 14B also converts to "phi3" but uses <|im_sep|>: see VOCAB_ARCH_TEMPLATES.
    "phi3": "phi3",
    "phimoe": "phi3",
    # one family per architecture, with a built-in written for it
    "llama4": "llama4",
    "gpt-oss": "gpt-oss",
    "command-r": "command-r",
    "exaone": "exaone3",
    "exaone4": "exaone4",
    "exaone-moe": "exaone-moe",
    # Granite 3.x/4.x: the same <|start_of_role|> turns (built-ins differ only for tool calls)
    "granite": "granite",
    "granitemoe": "granite",
    "granitehybrid": "granite-4.0",
    "hunyuan-moe": "hunyuan-moe",
    "hunyuan-dense": "hunyuan-dense",
    "hunyuan_vl": "hunyuan-vl",
    "seed_oss": "seed_oss",
    "rwkv6": "rwkv-world",
    "rwkv7": "rwkv-world",
}

#: Architectures whose right template can only be told from the vocabulary, tried in
#: order (after :data:`ARCH_TEMPLATES`) and only when the caller passes the vocab.
#: ``llama``: a Llama 3.x vocab has <|start_header_id|>/<|eot_id|>; a Llama 2 or
#: Mistral vocab does not, and their formats cannot be told apart from it, so they
#: get no template (llama-server keeps its default). ``phi3``: Phi-4 14B has <|im_sep|>.
VOCAB_ARCH_TEMPLATES: dict[str, tuple[str, ...]] = {
    "llama": ("llama3",),
    "phi3": ("phi4",),
}

#: Special tokens a built-in writes; when the vocab is known a template whose markers
#: are missing is not chosen (they would be tokenized as plain text -- the ChatML bug).
#: Templates without an entry are not checked.
TEMPLATE_MARKERS: dict[str, tuple[str, ...]] = {
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "phi3": ("<|user|>", "<|assistant|>", "<|end|>"),
    "phi4": ("<|im_start|>", "<|im_sep|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "llama4": ("<|header_start|>", "<|header_end|>", "<|eot|>"),
    "gpt-oss": ("<|start|>", "<|message|>", "<|end|>", "<|return|>"),
    "command-r": ("<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
    "granite": ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"),
    "granite-4.0": ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"),
}


def builtin_template_for(
    architecture: str,
    has_template: bool,
    accepted: frozenset[str] | None,
    vocab: Collection[str] | None = None,
) -> str | None:
    """The built-in template to pass as ``--chat-template``, or ``None`` for "pass nothing".

    ``None`` when the GGUF has its own template (llama-server uses it; overriding it
    would lose tool-call and reasoning support), when the architecture has no safe
    mapping, or when the mapped name is not in ``accepted`` (the names parsed from
    the installed binary's ``--help`` by :func:`parse_builtin_templates`).
    ``accepted=None`` means "not known yet": the deploy chooses while it prepares,
    before the release is built, and checks the name against the installed
    binary's list at execution time, before the unit changes
    (:func:`template_problem`), so an unchecked name never reaches a running unit.

    ``vocab`` (the GGUF's ``tokenizer.ggml.tokens``), when given, must contain the
    template's marker tokens (:data:`TEMPLATE_MARKERS`) and enables the
    vocabulary-only choices of :data:`VOCAB_ARCH_TEMPLATES` (``llama`` -> ``llama3``,
    ``phi3`` -> ``phi4``).
    """
    if has_template:
        return None
    candidates: list[str] = []
    if architecture in ARCH_TEMPLATES:
        candidates.append(ARCH_TEMPLATES[architecture])
    tokens: Collection[str] | None = None
    if vocab is not None:
        candidates.extend(VOCAB_ARCH_TEMPLATES.get(architecture, ()))
        tokens = vocab if isinstance(vocab, (set, frozenset)) else frozenset(vocab)
    for name in candidates:
        if accepted is not None and name not in accepted:
            continue
        if tokens is not None and not all(m in tokens for m in TEMPLATE_MARKERS.get(name, ())):
            continue
        return name
    return None


def server_args(template: str | None) -> list[str]:
    """llama-server arguments that make it render ``template`` (none for ``None``).

    ``--no-jinja`` is required: with jinja on (the b11434 default) the value of
    ``--chat-template`` is compiled as Jinja source, so a built-in name other than
    ``chatml`` renders as its own literal text. Validation happens after all
    arguments are parsed, so the order of the two flags does not matter (the help's
    "unless --jinja is set before this flag" is stale). Costs of the legacy path:
    requests with ``tools``/``tool_choice`` are refused ("requires --jinja flag") and
    reasoning is not parsed -- irrelevant for a model that ships no template.
    """
    if template is None:
        return []
    return ["--no-jinja", "--chat-template", template]


def template_problem(args: list[str], builtins: frozenset[str], binary: str) -> str | None:
    """Why ``args`` would not make ``binary`` use the built-in template it names, or None.

    Only a name used as a built-in (with ``--no-jinja``) is checked; a Jinja source
    passed by the user is the user's business.
    """
    if "--chat-template" not in args or "--no-jinja" not in args:
        return None
    name = args[args.index("--chat-template") + 1]
    if name in builtins:
        return None
    known = ", ".join(sorted(builtins)) or "none (its --help lists no built-in templates)"
    return f"{binary} has no built-in chat template {name!r} (it has: {known})"
