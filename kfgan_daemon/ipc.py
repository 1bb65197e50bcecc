"""Messages between the daemon and the child processes it starts itself (``python -m ...``).

A message is a 4-byte big-endian length, then a pickle. Only this package's own
processes speak it, over the pipes of a child they started: never read it from
anything else. Used by the dlib model server (``face.child``) and the live
bench's camera (``rtpapps.clipsender``).
"""
from __future__ import annotations

import asyncio
import os
import pickle
import struct
import sys
from typing import IO, Any

_HEADER = struct.Struct("!I")


def encode_message(message: object) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


def write_message(stream: IO[bytes], message: object) -> None:
    stream.write(encode_message(message))
    stream.flush()


def read_message(stream: IO[bytes]) -> Any:
    """The next message on ``stream`` (buffered or raw); EOFError when the other side has closed it."""
    (size,) = _HEADER.unpack(_read_exactly(stream, _HEADER.size))
    return pickle.loads(_read_exactly(stream, size))


async def read_message_async(reader: asyncio.StreamReader) -> Any:
    """The next message on ``reader``; EOFError when the other side has closed it."""
    try:
        (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
        return pickle.loads(await reader.readexactly(size))
    except asyncio.IncompleteReadError as exc:
        raise EOFError from exc


def own_stdout() -> IO[bytes]:
    """In a child: its standard output for messages alone. Anything a library prints from now on
    goes to standard error, where it cannot break a message."""
    messages = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return messages


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = stream.read(size - len(data))  # a raw stream may return less than asked
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)
