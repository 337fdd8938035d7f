"""TaskSet: an owner for background tasks, so none is garbage-collected mid-flight."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class TaskSet:
    """Holds a reference to every task it starts until the task is done.

    A failed task's exception is retrieved when it finishes, so asyncio never warns
    "exception was never retrieved"; callers that await the task still see it.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the running tasks to finish by themselves."""
        tasks = list(self._tasks)
        if tasks and timeout_s > 0:
            await asyncio.wait(tasks, timeout=timeout_s)

    async def cancel_all(self) -> None:
        """Cancel every task and wait for them to finish."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
