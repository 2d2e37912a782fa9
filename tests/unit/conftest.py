"""Unit tests are pure: each gets a short timeout (the suite's default is sized for e2e modules)."""

from __future__ import annotations

import pytest

#: seconds; the slowest unit test takes about 2 s on the 2-core CI machine
UNIT_TIMEOUT = 120


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("timeout") is None and "tests/unit/" in str(item.path):
            item.add_marker(pytest.mark.timeout(UNIT_TIMEOUT))
