"""SIGINT and SIGTERM as a request to stop, for every long-running command.

One helper for the daemon's modes (an asyncio loop: ``loop.add_signal_handler``,
so the request runs on the loop, between callbacks) and for training (no loop:
``signal.signal``, the flag read between steps). Off the main thread, or where
the platform has no signals, nothing is installed and the caller's other way of
stopping (an event, ``--max-steps``) is the only one.
"""
from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_on_signals(request: Callable[[], None]) -> Iterator[tuple[signal.Signals, ...]]:
    """Call ``request`` on SIGINT or SIGTERM while the block runs; yield the signals caught.

    The previous handlers are back when the block ends, so a second Ctrl-C after
    the block (during interpreter exit) behaves as usual.
    """
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    installed: list[signal.Signals] = []
    previous: dict[signal.Signals, object] = {}
    for sig in STOP_SIGNALS:
        try:
            if loop is not None:
                loop.add_signal_handler(sig, request)
            else:
                previous[sig] = signal.signal(sig, lambda signum, frame: request())
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # not the main thread, or no signals on this platform
        installed.append(sig)
    try:
        yield tuple(installed)
    finally:
        for sig in installed:
            if loop is not None:
                loop.remove_signal_handler(sig)
            else:
                signal.signal(sig, previous[sig])  # type: ignore[arg-type]
