"""Structured logs: one JSON object per line with the standard fields, extras and tracebacks."""
from __future__ import annotations

import io
import json
import logging

from kfgan_daemon.service.logs import JsonFormatter, configure_logging


def test_json_lines_carry_level_logger_message_extras_and_traceback() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("kfgan_daemon.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("stream %s lagging", "s1-v1", extra={"stream": "s1-v1", "lag_ms": 140})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("frame failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "warning" and first["logger"] == "kfgan_daemon.test_logs"
    assert first["msg"] == "stream s1-v1 lagging"
    assert (first["stream"], first["lag_ms"]) == ("s1-v1", 140)
    assert first["ts"].endswith("Z")
    assert second["level"] == "error" and "RuntimeError: boom" in second["exc"]


def test_configure_logging_sets_level_and_quietens_webrtc_libraries() -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        configure_logging("info", "json")
        assert root.level == logging.INFO
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        assert logging.getLogger("aioice").level == logging.WARNING
        configure_logging("debug", "text")
        assert logging.getLogger("aiortc").level == logging.DEBUG
        assert not isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.setLevel(saved[0])
        for handler in saved[1]:
            root.addHandler(handler)
        for name in ("aiortc", "aioice", "aiohttp.access"):
            logging.getLogger(name).setLevel(logging.NOTSET)
