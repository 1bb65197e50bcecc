"""The child process of ``face.child.ModelProcess``: ``python -m kfgan_daemon.face.model_server``.

A module of its own, imported by nothing, so that running it does not load a
second copy of a module the package already imported.
"""
from __future__ import annotations

import importlib
import os
import sys

from kfgan_daemon.face.child import PING
from kfgan_daemon.ipc import own_stdout, read_message, write_message


def serve() -> None:
    """Build the model, then answer calls until standard input closes."""
    requests = sys.stdin.buffer
    answers = own_stdout()
    factory, args, niceness = read_message(requests)
    if niceness:
        try:
            os.nice(niceness)
        except OSError as exc:  # a sandbox that refuses it: the work still gets done, at full priority
            print(f"kfgan_daemon.face.model_server: could not lower the priority: {exc}", file=sys.stderr)
    module_name, _, function = factory.partition(":")
    model = getattr(importlib.import_module(module_name), function)(*args)
    while True:
        try:
            method, call_args = read_message(requests)
        except EOFError:
            return
        try:
            answer = (True, None if method == PING else getattr(model, method)(*call_args))
        except Exception as exc:
            answer = (False, exc)
        write_message(answers, answer)


if __name__ == "__main__":
    serve()
