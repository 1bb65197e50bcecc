"""dlib models in a child process, so that their runs do not hold this process's GIL.

dlib's Python calls keep the GIL for their whole run: a face descriptor 80-180 ms,
a full-frame HOG detection at 720p about 100 ms on a CPU core. In a thread of the
live daemon every other thread (the other streams' face stages, the pastes, the
event loop) stands still meanwhile. In a child process the run only takes a core.

The child is ``python -m kfgan_daemon.face.model_server``, not a multiprocessing child:
multiprocessing's spawn re-imports the parent's main module, which breaks any
script without a ``__main__`` guard and any program read from standard input,
and a fork would inherit torch's thread pools in whatever state they were. The
child builds one model with a factory named ``module:function`` and answers
calls on it in order; requests and answers travel over its standard input and
output as ``kfgan_daemon.ipc`` messages.
"""
from __future__ import annotations

import logging
import pickle
import subprocess
import sys
import threading
from collections import deque
from concurrent.futures import Future
from typing import Any

from kfgan_daemon.errors import KfganError
from kfgan_daemon.ipc import read_message, write_message

log = logging.getLogger(__name__)

PING = ""  # a call that only waits for the model to be built


class ModelProcessError(KfganError, RuntimeError):
    """The child process failed to start its model, or died."""


class ModelProcess:
    """A child process that builds a model with ``factory(*args)`` (``factory`` is "module:function")
    and runs its methods. ``niceness`` lowers the child's CPU priority (background work that frames
    must not wait for). A child that dies fails the calls it held and is started again by the next."""

    def __init__(self, factory: str, args: tuple[Any, ...] = (), niceness: int = 0) -> None:
        self.factory = factory
        self.args = args
        self.niceness = niceness
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._pending: deque[Future] = deque()
        self._reader: threading.Thread | None = None
        self._closed = False

    def submit(self, method: str, *args: Any) -> Future:
        """Call ``method(*args)`` on the child's model; the future holds its answer."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise ModelProcessError(f"the {self.factory} process is closed")
            process = self._started()
            self._pending.append(future)
            try:
                assert process.stdin is not None
                write_message(process.stdin, (method, args))
            except (BrokenPipeError, OSError) as exc:
                self._pending.pop()
                future.set_exception(ModelProcessError(f"the {self.factory} process is gone: {exc}"))
        return future

    def warm(self) -> None:
        """Start the child and build its model now (seconds: on a worker thread, before going live)."""
        self.submit(PING).result()

    def close(self) -> None:
        """Let the child finish what it holds and exit."""
        with self._lock:
            self._closed = True
            process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        try:
            process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)

    def _started(self) -> subprocess.Popen[bytes]:
        if self._process is not None and self._process.poll() is None:
            return self._process
        if self._process is not None:
            log.warning("the %s process exited with %s; starting it again", self.factory, self._process.returncode)
        process = subprocess.Popen(
            [sys.executable, "-m", "kfgan_daemon.face.model_server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert process.stdin is not None
        write_message(process.stdin, (self.factory, self.args, self.niceness))
        self._process = process
        self._reader = threading.Thread(
            target=self._read_answers, args=(process,), name=f"kfgan-child-{self.factory.rpartition(':')[2]}", daemon=True
        )
        self._reader.start()
        return process

    def _read_answers(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        while True:
            try:
                ok, value = read_message(process.stdout)
            except (EOFError, OSError, pickle.UnpicklingError):
                break
            with self._lock:
                future = self._pending.popleft() if self._pending else None
            if future is None or not future.set_running_or_notify_cancel():
                continue  # cancelled by its caller meanwhile: nobody wants the answer
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        process.wait()
        with self._lock:
            if self._process is process:
                self._process = None
            stranded = list(self._pending) if self._process is None else []
            if self._process is None:
                self._pending.clear()
        for future in stranded:
            if future.set_running_or_notify_cancel():
                future.set_exception(ModelProcessError(f"the {self.factory} process exited ({process.returncode})"))
