"""Service settings: defaults, then a TOML file, then ``KFGAN_*`` environment variables, then CLI flags.

Every field is validated by pydantic; any problem becomes a :class:`ConfigError`
whose message starts with the field's name, e.g.
``port: Input should be less than or equal to 65535``.
"""
from __future__ import annotations

import re
import secrets
import socket
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, SecretStr, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from kfgan_daemon.errors import ConfigError
from kfgan_daemon.janus.config import JanusSettings

if TYPE_CHECKING:
    from kfgan_daemon.restore.settings import RestoreSettings

ENV_PREFIX = "KFGAN_"

# The TOML file for the Settings being built right now. A context variable rather
# than class state, so that two loads in different tasks or threads never mix.
_config_file: ContextVar[Path | None] = ContextVar("kfgan_config_file", default=None)

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")
_VIRTUAL_CAMERA = re.compile(r"^(v4l2:)?(/dev/video\d+)$")
_ICE_URL = re.compile(r"^stuns?:[^\s]+$")
# What a browser sends in its Origin header: scheme, host, optional port, nothing else.
_ORIGIN = re.compile(r"^https?://[a-z0-9.\-]+(:\d{1,5})?$|^https?://\[[0-9a-f:.]+\](:\d{1,5})?$")
# An instance id starts every session id ("<instance_id>.<token>") and names the daemon's
# server in a balancer's config (HAProxy routes /streams/{id} by it), so it must be a valid
# HAProxy server name and a URL path segment, and contain no "." (the separator).
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_STREAM_COUNT = TypeAdapter(Annotated[int, Field(ge=1, le=256)])


def default_instance_id() -> str:
    """The short host name and a random suffix: unique even for several daemons on one host (or pod network)."""
    host = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().split(".")[0].lower()).strip("-")[:50] or "kfgan"
    return f"{host}-{secrets.token_hex(3)}"


class Settings(BaseSettings):
    """Everything ``kfgan-daemon serve`` can be told. See ``systemd/kfgan-daemon.toml`` for a commented example."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        # KFGAN_JANUS__URL sets [janus] url
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        case_sensitive=False,
    )

    # HTTP control plane
    host: str = Field("127.0.0.1", min_length=1, description="address the HTTP server binds")
    port: int = Field(8470, ge=0, le=65535, description="HTTP port; 0 picks a free one")
    token: SecretStr | None = Field(None, description="bearer token every request except /healthz must carry")
    max_request_bytes: int = Field(
        256 * 1024, ge=1024, le=16 * 1024 * 1024, description="largest accepted request body"
    )
    max_streams: int | Literal["auto"] = Field(
        "auto",
        description='concurrent WebRTC streams; more are refused with 503. "auto": as many as the engine measures '
        "it can serve on this machine",
    )
    instance_id: str = Field(
        default_factory=default_instance_id,
        description="this daemon's name among several behind one balancer; starts every session id",
    )
    stun_servers: list[str] = Field(default_factory=list, description="STUN URLs for ICE (none on a LAN)")
    cors_origins: list[str] = Field(
        default_factory=list, description="origins (https://host[:port]) whose pages may call the API; none by default"
    )
    offer_rate_limit: str | None = Field(
        "30/minute", description="offers one client address may make, e.g. 30/minute or 5/second; empty: no limit"
    )

    # model
    model: Path | None = Field(None, description="generator checkpoint; the shipped guided model when unset")
    variant: Literal["full", "guided", "lite"] | None = Field(None, description="architecture when the checkpoint does not say")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or mps")
    half: bool = Field(False, description="float16 inference (CUDA only)")
    warmup: bool = Field(True, description="run one generator batch before reporting ready")

    # streaming engine
    overload_policy: Literal["passthrough", "drop"] = Field(
        "passthrough", description="what a live output does with a frame the generator cannot take in time"
    )
    max_latency_ms: float = Field(
        100.0, gt=0.0, le=2000.0, description="latency a live frame may gain before it is passed through or dropped"
    )
    max_batch: int = Field(4, ge=1, le=64, description="largest generator batch across streams")
    max_batch_wait_ms: float = Field(5.0, ge=0.0, le=100.0, description="how long the inference worker waits to fill a batch")
    min_restored_share: float = Field(
        0.2, gt=0.0, le=1.0,
        description='the cadence a call must get, as the share of its frames restored: what "auto" capacity admits by',
    )
    target_busy: float = Field(
        0.85, gt=0.0, le=1.0, description="share of the usable cores the live plan keeps busy (the rest is headroom)"
    )

    # per-stream restoration
    detector: Literal["hog", "cnn"] = "hog"
    redetect_interval: int = Field(30, ge=1, le=10_000)
    keyframe_store_size: int = Field(10, ge=1, le=100)
    keyframe_policy: Literal["lfu", "max_distance"] = "lfu"
    warp_mode: Literal["fast", "published"] = "fast"
    paste_mode: Literal["correction", "replace"] = Field(
        "correction",
        description="correction: add the generator's change to the frame's own pixels; replace: the published full paste",
    )
    predictor_path: Path | None = None
    detector_path: Path | None = None
    alignment: Literal["subpixel", "published"] = Field(
        "subpixel", description="subpixel: the crop follows the face smoothly; published: integer eye centres (parity)"
    )
    smooth_landmarks: bool = Field(True, description="One Euro filter on the landmarks (steadier crops, less shimmer)")
    repeat_update: float = Field(
        0.25, gt=0.0, le=1.0,
        description="where the codec repeated a pixel of the previous frame, how far the output moves towards the "
        "fresh restoration (1: not at all held)",
    )
    identity_lost_seconds: float = Field(
        2.0, ge=0.0, le=3600.0, description="a face gone this long empties the stream's keyframe store"
    )
    identity_check: bool = Field(
        True, description="empty the keyframe store when a newly found face is another person (dlib face descriptor)"
    )
    identity_distance: float = Field(
        0.6, gt=0.0, le=2.0, description="descriptor distance beyond which it is another person"
    )
    descriptor_path: Path | None = None

    # dead and never-connected callers
    connect_timeout: float = Field(
        10.0, ge=1.0, le=300.0, description="seconds an answered offer may take to connect before its slot is freed"
    )
    media_timeout: float = Field(
        3.0, ge=0.5, le=300.0, description="seconds without any media or RTCP from a connected caller before it is hung up"
    )

    # WebRTC keyframe requests
    pli_distance_threshold: float = Field(12.0, gt=0.0, description="landmark distance (crop px) that asks for a PLI")
    pli_interval: float = Field(1.0, ge=0.1, le=60.0, description="seconds between two PLIs to one sender")

    # virtual camera mirror of the restored stream
    virtual_camera: str | None = Field(None, description="v4l2:/dev/videoN to mirror the restored stream to")
    virtual_camera_fps: int = Field(30, ge=1, le=120)

    # lifecycle and logs
    drain_timeout: float = Field(
        10.0, ge=0.0, le=300.0, description="seconds SIGTERM lets live calls go on before hanging them up"
    )
    watchdog: bool = Field(True, description="send systemd WATCHDOG=1 pings when the unit sets WatchdogSec")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    # kfgan-daemon janus: the Janus server and rooms to restore (the [janus] table)
    janus: JanusSettings | None = Field(None, description="the Janus VideoRooms `kfgan-daemon janus` restores")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: CLI flags (init), then the environment, then the file.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=_config_file.get()))

    @field_validator("log_level", "log_format", "overload_policy", "detector", "keyframe_policy", "warp_mode",
                     "paste_mode", "variant", mode="before")
    @classmethod
    def _lower_case(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("max_streams", mode="plain")
    @classmethod
    def _auto_or_count(cls, value: Any) -> int | Literal["auto"]:
        # A plain union would report one error per member ("max_streams.int: ...", "max_streams.literal[...]").
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            return _STREAM_COUNT.validate_python(value)
        except ValidationError as exc:
            raise ValueError(f'{exc.errors()[0]["msg"]} (or "auto")') from None

    @field_validator("instance_id")
    @classmethod
    def _routable_instance_id(cls, value: str) -> str:
        if not _INSTANCE_ID.fullmatch(value):
            raise ValueError(
                f"expected 1-63 letters, digits, '-' or '_' (a balancer's server name), starting with a letter or "
                f"digit, got {value!r}"
            )
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"expected cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @field_validator("model", "predictor_path", "detector_path", "descriptor_path")
    @classmethod
    def _existing_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        path = value.expanduser()
        if not path.is_file():
            raise ValueError(f"file {path} does not exist")
        return path

    @field_validator("token")
    @classmethod
    def _long_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("a bearer token needs at least 16 characters")
        return value

    @field_validator("virtual_camera")
    @classmethod
    def _v4l2_device(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        match = _VIRTUAL_CAMERA.match(value)
        if not match:
            raise ValueError(f"expected v4l2:/dev/videoN, got {value!r}")
        return match.group(2)

    @field_validator("stun_servers")
    @classmethod
    def _stun_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not _ICE_URL.match(url):
                raise ValueError(f"expected stun:HOST[:PORT] URLs, got {url!r}")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _exact_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin == "*":
                raise ValueError("list each origin allowed to call the daemon; '*' would let any web page in")
            if not _ORIGIN.match(origin):
                raise ValueError(
                    f"expected origins like https://app.example.com:8443 (lower case, no path or trailing slash), "
                    f"got {origin!r}"
                )
        return value

    @field_validator("offer_rate_limit")
    @classmethod
    def _rate_limit(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        import limits

        try:
            amount = limits.parse(value).amount
        except ValueError:
            amount = 0
        if amount < 1:
            raise ValueError(f"expected COUNT/second, COUNT/minute or COUNT/hour with COUNT >= 1, got {value!r}")
        return value

    @model_validator(mode="after")
    def _half_needs_cuda(self) -> "Settings":
        if self.half and not self.device.startswith("cuda"):
            raise ValueError("half: float16 inference needs a CUDA device (set device = \"cuda\")")
        return self

    @classmethod
    def load(cls, config: str | Path | None = None, **overrides: Any) -> "Settings":
        """Build settings from the optional TOML file, the environment and explicit overrides.

        Overrides whose value is None are ignored, so CLI options that were not
        given do not mask the file or the environment.
        """
        path = Path(config).expanduser() if config is not None else None
        if path is not None and not path.is_file():
            raise ConfigError(f"config: file {path} does not exist")
        given = {key: value for key, value in overrides.items() if value is not None}
        token = _config_file.set(path)
        try:
            return cls(**given)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
        finally:
            _config_file.reset(token)

    def restore_settings(self) -> "RestoreSettings":
        """The per-stream part, as the restorer's plain dataclass."""
        from kfgan_daemon.restore.settings import RestoreSettings

        return RestoreSettings(
            detector=self.detector,
            redetect_interval=self.redetect_interval,
            keyframe_store_size=self.keyframe_store_size,
            keyframe_policy=self.keyframe_policy,
            warp_mode=self.warp_mode,
            paste_mode=self.paste_mode,
            pli_distance_threshold=self.pli_distance_threshold,
            predictor_path=self.predictor_path,
            detector_path=self.detector_path,
            alignment=self.alignment,
            smooth_landmarks=self.smooth_landmarks,
            repeat_update=self.repeat_update,
            identity_lost_seconds=self.identity_lost_seconds,
            identity_check=self.identity_check,
            identity_distance=self.identity_distance,
            descriptor_path=self.descriptor_path,
        )


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each starting with the field name."""
    lines = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or "config"
        message = error["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        if field == "config" and ":" in message.split(" ", 1)[0]:
            lines.append(message)
        else:
            lines.append(f"{field}: {message}")
    return "; ".join(lines)
