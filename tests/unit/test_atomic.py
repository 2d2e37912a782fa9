"""Where atomic replacements stage their content."""

from __future__ import annotations

import posixpath

from llamadeploy.atomic import staging_path


def test_staging_path_is_a_hidden_sibling():
    """Same directory as the destination, so the final ``mv`` is a rename(2) on one filesystem."""
    dest = "/etc/systemd/system/llama-server.service"
    stage = staging_path(dest)
    assert stage == "/etc/systemd/system/.llama-server.service.llamadeploy-stage"
    assert posixpath.dirname(stage) == posixpath.dirname(dest)
    # a link path gets a sibling too (``current`` → ``.current...``), never a path inside it
    assert staging_path("/opt/llama.cpp/current") == "/opt/llama.cpp/.current.llamadeploy-stage"
