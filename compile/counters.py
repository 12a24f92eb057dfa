"""torch's own compile counters, read rather than re-implemented.

``torch._dynamo.utils.counters["stats"]["unique_graphs"]`` grows by one for every graph dynamo compiles, so
the difference around a call is the number of (re)compiles it caused. When dynamo hits its recompile limit
it stops compiling the function and runs it eagerly with only a log warning; :class:`RecompileLimitWatcher`
turns that warning into a flag we can report.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, List


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def graph_break_count() -> int:
    """Graph breaks dynamo has met in this process so far: each splits a compiled function into pieces with
    Python between them (slower, and a CUDA graph per piece)."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


class _Count:
    def __init__(self) -> None:
        self.new_graphs = 0


@contextlib.contextmanager
def count_new_graphs() -> Iterator[_Count]:
    """``with count_new_graphs() as c: ...`` then ``c.new_graphs`` is how many graphs the block compiled."""
    result = _Count()
    before = compiled_graph_count()
    try:
        yield result
    finally:
        result.new_graphs = compiled_graph_count() - before


class RecompileLimitWatcher(logging.Handler):
    """Records dynamo's "hit config.recompile_limit" warnings (after which it silently runs eagerly)."""

    _LOGGER = "torch._dynamo.convert_frame"

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "hit config." in message and "limit" in message:
            self.messages.append(message.splitlines()[0])

    @classmethod
    def install(cls) -> "RecompileLimitWatcher":
        logger = logging.getLogger(cls._LOGGER)
        for handler in logger.handlers:
            if isinstance(handler, cls):
                return handler
        watcher = cls()
        logger.addHandler(watcher)
        return watcher
