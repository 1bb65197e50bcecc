"""Where the pipe's output goes: ``rtp://HOST:PORT`` or ``-`` (y4m on stdout), and the SDP of an RTP output."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from urllib.parse import urlsplit

from kfgan_daemon.errors import ConfigError, OutputError
from kfgan_daemon.media.rtp import H264SessionDescription


@dataclass(frozen=True, slots=True)
class OutputTarget:
    """``rtp://HOST:PORT`` (host an IP address) or ``-`` (y4m on stdout)."""

    kind: str  # "rtp" or "y4m"
    host: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, output: str) -> "OutputTarget":
        """Raises :class:`ConfigError` naming the ``output`` field for anything else."""
        if output == "-":
            return cls("y4m")
        parts = urlsplit(output)
        if parts.scheme != "rtp":
            raise ConfigError(f"output: {output!r} is neither rtp://HOST:PORT nor - (y4m on stdout)")
        try:
            host, port = parts.hostname, parts.port
        except ValueError:
            raise ConfigError(f"output: {output!r} has an invalid port") from None
        if not host or port is None or not 0 < port < 65536:
            raise ConfigError(f"output: {output!r} must name a host and a port, e.g. rtp://127.0.0.1:5004")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"output: host {host!r} must be an IP address") from None
        return cls("rtp", host, port)

    def __str__(self) -> str:
        return "-" if self.kind == "y4m" else f"rtp://{self.host}:{self.port}"


def write_output_sdp(path: Path, target: OutputTarget, frame_rate: Fraction | None) -> None:
    """Write the SDP a player opens to receive an RTP output (parameter sets travel in-band)."""
    if target.host is None or target.port is None:
        raise ConfigError("output-sdp: only an rtp:// output has an SDP")
    description = H264SessionDescription(
        address=target.host, port=target.port, frame_rate=frame_rate, session_name="kfgan-daemon restored"
    )
    try:
        path.write_text(description.to_sdp(), encoding="ascii")
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the output SDP ({exc.strerror or exc})") from exc
