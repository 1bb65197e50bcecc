"""dlib models in a child process, so that their runs do not hold this process's GIL.

dlib's Python calls keep the GIL for their whole run: a face descriptor 80-180 ms,
a full-frame HOG detection at 720p about 100 ms on a CPU core. In a thread of the
live daemon every other thread (the other streams' face stages, the pastes, the
event loop) stands still meanwhile. In a child process the run only takes a core.
One worker per child, so calls are answered in order; the model is built once by
the child's initializer. Children are spawned, not forked: a fork would inherit
torch's thread pools in whatever state they were.
"""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any


class ModelProcess:
    """A child process that builds a model with ``initializer(*initargs)`` and runs calls on it.

    ``niceness`` lowers the child's CPU priority (background work that frames must not wait for).
    """

    def __init__(self, initializer: Callable[..., None], initargs: tuple[Any, ...], niceness: int = 0) -> None:
        context = multiprocessing.get_context("spawn")
        self._pool = ProcessPoolExecutor(
            max_workers=1, mp_context=context, initializer=_start_child, initargs=(niceness, initializer, initargs)
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run module-level ``fn(*args)`` in the child; its arguments and answer travel pickled."""
        return self._pool.submit(fn, *args)

    def warm(self) -> None:
        """Start the child and build its model now (seconds: on a worker thread, before going live)."""
        self._pool.submit(os.getpid).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _start_child(niceness: int, initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
    if niceness:
        os.nice(niceness)
    initializer(*initargs)
