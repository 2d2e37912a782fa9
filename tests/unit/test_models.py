"""Choosing repo files (quant, split GGUF) and naming the served model; no network."""

from __future__ import annotations

import pytest

from llamadeploy.roles.model.source import ModelError, default_alias, pick_files

REPO = [
    "README.md",
    "qwen2.5-3b-instruct-q4_k_m.gguf",
    "qwen2.5-3b-instruct-q8_0.gguf",
    "qwen2.5-3b-instruct-fp16-00001-of-00002.gguf",
    "qwen2.5-3b-instruct-fp16-00002-of-00002.gguf",
]


def test_filename_and_quant():
    assert pick_files("r", REPO, "qwen2.5-3b-instruct-q8_0.gguf", None) == ["qwen2.5-3b-instruct-q8_0.gguf"]
    assert pick_files("r", REPO, None, "Q4_K_M") == ["qwen2.5-3b-instruct-q4_k_m.gguf"]


def test_split_gguf_fetched_whole_first_part_first():
    parts = ["qwen2.5-3b-instruct-fp16-00001-of-00002.gguf", "qwen2.5-3b-instruct-fp16-00002-of-00002.gguf"]
    assert pick_files("r", REPO, None, "fp16") == parts
    assert pick_files("r", REPO, parts[0], None) == parts
    with pytest.raises(ModelError, match="not the first part"):
        pick_files("r", REPO, parts[1], None)
    with pytest.raises(ModelError, match="missing qwen2.5-3b-instruct-fp16-00002-of-00002.gguf"):
        pick_files("r", REPO[:4], parts[0], None)


def test_missing_file_and_quant_named():
    with pytest.raises(ModelError, match=r"r has no file 'x.gguf' \(its .gguf files: "):
        pick_files("r", REPO, "x.gguf", None)
    with pytest.raises(ModelError, match="no .gguf file for quant 'IQ2_XS'"):
        pick_files("r", REPO, None, "IQ2_XS")


def test_default_alias():
    assert default_alias("sub/gemma-3-270m-it-Q4_K_M.gguf") == "gemma-3-270m-it-Q4_K_M"
    assert default_alias("m-fp16-00001-of-00003.gguf") == "m-fp16"


def test_same_name_content_is_staged_by_content_and_free_names_go_in_place():
    """A name that a release reads now with other content, or content the host kept, waits under
    ``.kept/<sha256>/`` for the switch; a free name, or one holding the content, is not staged."""
    from llamadeploy.atomic import HashState
    from llamadeploy.config import HostConfig
    from llamadeploy.roles.model import OnHost, load_path, staged_files
    from llamadeploy.roles.model.source import ModelArtifact, ModelFile

    cfg = HostConfig.model_validate({"model": {"path": "/m.gguf"}, "server": {"allow_unauthenticated": True}})
    new, kept, free, same = (ModelFile(n, "", 1, c * 64) for n, c in
                             (("new.gguf", "a"), ("kept.gguf", "b"), ("free.gguf", "c"), ("same.gguf", "d")))
    art = ModelArtifact((new, kept, free, same), "m")
    state = HashState(sha256="e" * 64, recorded=True)
    on_host = OnHost(present={"same.gguf": HashState(sha256="d" * 64, recorded=True)},
                     other={"new.gguf": state, "kept.gguf": state}, kept=frozenset({"kept.gguf"}))
    staged = staged_files(art, on_host)
    assert staged == (new, kept)
    assert load_path(cfg, new, staged) == f"{cfg.model_dir}/.kept/{'a' * 64}/new.gguf"
    assert load_path(cfg, free, staged) == f"{cfg.model_dir}/free.gguf"
    assert load_path(cfg, same, staged) == f"{cfg.model_dir}/same.gguf"
