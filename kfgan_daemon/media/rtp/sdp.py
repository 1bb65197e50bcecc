"""Session descriptions (RFC 4566) for one H.264 RTP video stream (RFC 6184).

``parse_sdp`` reads what ffmpeg (``-sdp_file``), GStreamer or a hand-written
file says about the stream to receive; ``H264SessionDescription.to_sdp`` writes
the file ffmpeg, GStreamer and VLC open to receive our output
(``ffmpeg -protocol_whitelist file,udp,rtp -i out.sdp``).
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass, field
from fractions import Fraction

from kfgan_daemon.errors import SdpError

_LINE = re.compile(r"^([a-z])=(.*)$")
_RTPMAP = re.compile(r"^(\d+)\s+([\w.-]+)/(\d+)(?:/\S+)?$")
_PLAIN_RTP_PROFILES = {"RTP/AVP", "RTP/AVPF"}


@dataclass(slots=True)
class H264SessionDescription:
    """What a receiver needs to know about one H.264 RTP stream."""

    address: str
    port: int
    payload_type: int = 96
    clock_rate: int = 90000
    packetization_mode: int = 1
    profile_level_id: str | None = None
    sprop_parameter_sets: list[bytes] = field(default_factory=list)
    frame_rate: Fraction | None = None
    session_name: str = "kfgan-daemon"

    def to_sdp(self) -> str:
        family = "IP6" if ipaddress.ip_address(self.address).version == 6 else "IP4"
        fmtp = [f"packetization-mode={self.packetization_mode}"]
        if self.profile_level_id:
            fmtp.append(f"profile-level-id={self.profile_level_id}")
        if self.sprop_parameter_sets:
            sets = ",".join(base64.b64encode(unit).decode("ascii") for unit in self.sprop_parameter_sets)
            fmtp.append(f"sprop-parameter-sets={sets}")
        lines = [
            "v=0",
            f"o=- 0 0 IN {family} {self.address}",
            f"s={self.session_name}",
            f"c=IN {family} {self.address}",
            "t=0 0",
            f"m=video {self.port} RTP/AVP {self.payload_type}",
            f"a=rtpmap:{self.payload_type} H264/{self.clock_rate}",
            f"a=fmtp:{self.payload_type} {';'.join(fmtp)}",
        ]
        if self.frame_rate:
            lines.append(f"a=framerate:{float(self.frame_rate):g}")
        return "\r\n".join(lines) + "\r\n"


def parse_sdp(text: str) -> H264SessionDescription:
    """The first H.264 video stream of an SDP text; :class:`SdpError` says why one cannot be used."""
    lines = [line.strip() for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    if not lines or lines[0] != "v=0":
        raise SdpError("not an SDP file: it must start with 'v=0'")
    session_address: str | None = None
    session_name = ""
    media: list[dict] = []
    for number, line in enumerate(lines, start=1):
        match = _LINE.match(line)
        if match is None:
            raise SdpError(f"SDP line {number} is not of the form 'x=value': {line[:60]!r}")
        kind, value = match.groups()
        if kind == "m":
            media.append({"m": value, "c": None, "a": [], "line": number})
        elif kind == "c":
            if media:
                media[-1]["c"] = value
            else:
                session_address = value
        elif kind == "a" and media:
            media[-1]["a"].append(value)
        elif kind == "s":
            session_name = value
    videos = [section for section in media if section["m"].split()[:1] == ["video"]]
    if not videos:
        raise SdpError("the SDP describes no video stream (no 'm=video' line)")
    errors = []
    for section in videos:
        try:
            return _parse_video(section, session_address, session_name)
        except SdpError as exc:
            errors.append(str(exc))
    raise SdpError("; ".join(errors))


def _parse_video(section: dict, session_address: str | None, session_name: str) -> H264SessionDescription:
    where = f"m=video (line {section['line']})"
    fields = section["m"].split()
    if len(fields) < 4:
        raise SdpError(f"{where}: expected 'm=video PORT RTP/AVP PAYLOAD-TYPES'")
    try:
        port = int(fields[1].split("/")[0])
    except ValueError:
        raise SdpError(f"{where}: port {fields[1]!r} is not a number") from None
    if not 0 < port < 65536:
        raise SdpError(f"{where}: port {port} is not usable (1-65535)")
    if fields[2] not in _PLAIN_RTP_PROFILES:
        raise SdpError(f"{where}: transport {fields[2]} is not supported (plain RTP/AVP only; no SRTP)")
    formats = fields[3:]
    rtpmaps: dict[str, tuple[str, int]] = {}
    fmtps: dict[str, dict[str, str]] = {}
    frame_rate = None
    for attribute in section["a"]:
        name, _, value = attribute.partition(":")
        if name == "rtpmap":
            match = _RTPMAP.match(value.strip())
            if match is None:
                raise SdpError(f"{where}: malformed rtpmap {value!r}")
            rtpmaps[match.group(1)] = (match.group(2).upper(), int(match.group(3)))
        elif name == "fmtp":
            payload_type, _, parameters = value.strip().partition(" ")
            fmtps[payload_type] = _parse_fmtp(parameters)
        elif name == "framerate":
            frame_rate = _frame_rate(value.strip(), where)
    h264 = [fmt for fmt in formats if rtpmaps.get(fmt, ("", 0))[0] == "H264"]
    if not h264:
        offered = ", ".join(f"{fmt} {rtpmaps[fmt][0]}" if fmt in rtpmaps else fmt for fmt in formats)
        raise SdpError(f"{where}: no H264 payload type (offered: {offered}); only H.264 video is supported")
    chosen = h264[0]
    _, clock_rate = rtpmaps[chosen]
    if clock_rate != 90000:
        raise SdpError(f"{where}: H264 clock rate must be 90000, not {clock_rate}")
    parameters = fmtps.get(chosen, {})
    try:
        mode = int(parameters.get("packetization-mode", "0"))
    except ValueError:
        raise SdpError(f"{where}: packetization-mode {parameters['packetization-mode']!r} is not a number") from None
    if mode not in (0, 1):
        raise SdpError(f"{where}: packetization-mode {mode} is not supported (0 or 1; interleaved mode 2 is not)")
    sprop = []
    for encoded in filter(None, parameters.get("sprop-parameter-sets", "").split(",")):
        try:
            sprop.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            raise SdpError(f"{where}: sprop-parameter-sets entry {encoded!r} is not base64") from None
    return H264SessionDescription(
        address=_connection_address(section["c"] or session_address, where),
        port=port,
        payload_type=int(chosen),
        clock_rate=clock_rate,
        packetization_mode=mode,
        profile_level_id=parameters.get("profile-level-id"),
        sprop_parameter_sets=sprop,
        frame_rate=frame_rate,
        session_name=session_name or "kfgan-daemon",
    )


def _frame_rate(value: str, where: str) -> Fraction:
    """``a=framerate`` is a decimal; 29.97 means 30000/1001, as NTSC rates always do."""
    try:
        rate = float(value)
    except ValueError:
        raise SdpError(f"{where}: malformed framerate {value!r}") from None
    if not rate > 0:
        raise SdpError(f"{where}: framerate {value!r} is not positive")
    ntsc = Fraction(round(rate * 1.001) * 1000, 1001)
    for candidate in (Fraction(round(rate)), ntsc):
        if candidate and abs(float(candidate) - rate) < 0.005:
            return candidate
    return Fraction(value).limit_denominator(1000)


def _parse_fmtp(parameters: str) -> dict[str, str]:
    values = {}
    for item in parameters.split(";"):
        key, _, value = item.strip().partition("=")
        if key:
            values[key.strip().lower()] = value.strip()
    return values


def _connection_address(value: str | None, where: str) -> str:
    if value is None:
        raise SdpError(f"{where}: no connection address ('c=IN IP4 ADDRESS') in the session or the media section")
    fields = value.split()
    if len(fields) != 3 or fields[0] != "IN" or fields[1] not in ("IP4", "IP6"):
        raise SdpError(f"{where}: malformed connection line 'c={value}'")
    address = fields[2].split("/")[0]
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise SdpError(f"{where}: connection address {address!r} is not an IP address") from None
    if parsed.is_multicast:
        raise SdpError(f"{where}: multicast address {address} is not supported; send unicast to this host")
    return address
