"""Run an engine's calls one at a time, in arrival order, on one dedicated OS thread.

Why not `asyncio.to_thread` + a lock: waiting calls would each hold a thread of the
default pool and the lock would admit them in no particular order (p95 latency blew up
under load); and OpenMP keeps its thread team per OS thread, so one fixed thread keeps
one team instead of re-creating teams across pool threads.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class SerialExecutor:
    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Await `function(*args, **kwargs)` on the executor's thread. A call cancelled
        while still queued never starts."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(function, *args, **kwargs))
