"""Messages between the daemon and its own child processes (kfgan_daemon.ipc)."""
from __future__ import annotations

import asyncio
import os
import threading

import numpy as np
import pytest

from kfgan_daemon.ipc import encode_message, read_message, read_message_async, write_message


def test_messages_cross_a_raw_pipe_whole_and_a_closed_pipe_says_eof() -> None:
    read_end, write_end = os.pipe()
    crop = np.arange(256 * 256 * 3, dtype=np.uint8).reshape(256, 256, 3)

    def send() -> None:
        with open(write_end, "wb") as writer:
            write_message(writer, ("describe", (crop,)))
            write_message(writer, None)

    # The 196 KB crop is more than a pipe holds: a writer beside the reader, which gets it in pieces.
    writer = threading.Thread(target=send)
    writer.start()
    with open(read_end, "rb", buffering=0) as reader:
        method, (received,) = read_message(reader)
        assert method == "describe" and np.array_equal(received, crop)
        assert read_message(reader) is None
        with pytest.raises(EOFError):
            read_message(reader)
    writer.join()


async def test_an_event_loop_reads_the_same_messages() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(encode_message({"pid": 7}) + encode_message([1, 2])[:-1])
    reader.feed_eof()
    assert await read_message_async(reader) == {"pid": 7}
    with pytest.raises(EOFError):
        await read_message_async(reader)  # cut short: the other side died mid-message
