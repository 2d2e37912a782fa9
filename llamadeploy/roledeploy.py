"""``@role``: pyinfra's ``@deploy``, typed as the function it wraps.

pyinfra types a decorated deploy as its operation protocol, whose ``__call__``
takes the global arguments (``_sudo``, ...) positionally first and returns an
``OperationMeta``. Our role functions take a config positionally and return the
operations a later step gates on, so under that typing mypy can check neither.
The behaviour is pyinfra's own; only the static type changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar, cast

from pyinfra.api import deploy

P = ParamSpec("P")
R = TypeVar("R")


def role(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Group a role's operations under ``name`` in pyinfra's output (``@deploy(name)``)."""

    def wrap(func: Callable[P, R]) -> Callable[P, R]:
        return cast(Callable[P, R], deploy(name)(func))

    return wrap
