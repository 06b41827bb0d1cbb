"""Say so when a compiled step compiles: the first call of a ``torch.compile``\\ d step
traces and compiles for seconds to minutes, which should not pass in silence.

The messages go to the ``functorch_reg`` logger at level INFO; show them with
``logging.basicConfig(level=logging.INFO)`` (or a handler on that logger).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Generic, TypeVar

__all__ = ["Announced", "logger"]

logger = logging.getLogger("functorch_reg")

F = TypeVar("F")


class Announced(Generic[F]):
    """``function`` (a compiled callable) that logs "compiling" before its first call
    and the seconds it took after.

    Example:
        >>> from functorch_reg._compile_log import Announced
        >>> step = Announced(lambda x: x + 1, "train_step")
        >>> step(1)
        2
    """

    def __init__(self, function: F, what: str) -> None:
        self.function = function
        self.what = what
        self.first = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.first:
            return self.function(*args, **kwargs)  # type: ignore[operator]
        logger.info(
            "%s: compiling (torch.compile traces and compiles on the first call; "
            "seconds to minutes on a CPU)",
            self.what,
        )
        start = time.perf_counter()
        out = self.function(*args, **kwargs)  # type: ignore[operator]
        self.first = False
        logger.info("%s: compiled in %.1f s", self.what, time.perf_counter() - start)
        return out
