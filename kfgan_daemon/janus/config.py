"""The ``[janus]`` table of the daemon's settings: which Janus, which rooms, where its RTP comes to.

Everything else (model, engine, restoration, capacity (``max_streams``:
publishers restored at once), keyframe requests (``pli_interval``), logs, the
HTTP port that serves ``/healthz``, ``/readyz``, ``/metrics`` and
``/publishers``) is the same :class:`Settings` as ``serve``'s, so one file
configures both modes.
"""
from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

_JANUS_URL = re.compile(r"^https?://[^\s/]+(/[^\s]*)?$")


class JanusSettings(BaseModel):
    """How ``kfgan-daemon janus`` reaches a Janus server and which VideoRooms it restores."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="Janus's HTTP API, e.g. http://127.0.0.1:8088/janus")
    api_secret: SecretStr | None = Field(None, description="Janus's api_secret (janus.jcfg), when it sets one")
    token: SecretStr | None = Field(None, description="a stored Janus token, when it uses token auth")
    rooms: list[int] = Field(min_length=1, description="VideoRoom ids whose publishers are restored")
    room_secret: SecretStr | None = Field(
        None, description="the rooms' secret, when they have one (rtp_forward and remote publishers need it)"
    )
    forward_host: str = Field(
        "127.0.0.1", min_length=1, description="the daemon's address as Janus reaches it: where publishers' RTP is sent"
    )
    publish_iface: str = Field(
        "127.0.0.1", min_length=1,
        description="the Janus host's address the restored feeds' RTP is sent to (a remote publisher listens there)",
    )
    restored_suffix: str = Field(
        " (restored)", min_length=1, description="appended to a publisher's display name for its restored feed"
    )
    poll_interval: float = Field(
        0.5, ge=0.05, le=60.0, description="seconds between two looks at a room's publishers"
    )
    reconnect_interval: float = Field(
        2.0, ge=0.1, le=300.0, description="seconds between two tries to reach a Janus that went away"
    )
    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not _JANUS_URL.match(value):
            raise ValueError(f"expected Janus's HTTP API URL, like http://127.0.0.1:8088/janus, got {value!r}")
        return value.rstrip("/")

    @field_validator("rooms")
    @classmethod
    def _distinct_rooms(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"each room once, got {value}")
        return value
