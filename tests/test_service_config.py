"""Service settings: TOML file, KFGAN_* environment, CLI overrides, and errors that name the field."""
from __future__ import annotations

from pathlib import Path

import pytest

from kfgan_daemon.errors import ConfigError
from kfgan_daemon.service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "systemd" / "kfgan-daemon.toml"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("KFGAN_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kfgan.toml"
    path.write_text(text)
    return path


def test_defaults_bind_loopback() -> None:
    settings = Settings.load()
    assert settings.host == "127.0.0.1"
    assert settings.token is None
    assert settings.overload_policy == "passthrough"
    assert settings.keyframe_store_size == 10


def test_example_config_is_valid_and_matches_defaults() -> None:
    # The shipped example documents the defaults; drift between the two is a bug in one of them.
    from_file = Settings.load(EXAMPLE)
    # instance_id is the one default that differs at every start (host name and a random suffix).
    assert from_file.model_dump(exclude={"instance_id"}) == Settings.load().model_dump(exclude={"instance_id"})


def test_file_then_environment_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path, 'port = 9000\nhost = "0.0.0.0"\nmax_streams = 2\n')
    assert Settings.load(config).port == 9000
    monkeypatch.setenv("KFGAN_PORT", "9100")
    monkeypatch.setenv("KFGAN_MAX_STREAMS", "3")
    settings = Settings.load(config)
    assert (settings.port, settings.max_streams, settings.host) == (9100, 3, "0.0.0.0")
    # CLI flags win; flags that were not given (None) leave the rest alone.
    settings = Settings.load(config, port=9200, host=None)
    assert (settings.port, settings.host) == (9200, "0.0.0.0")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"port": 70000}, "port: Input should be less than or equal to 65535"),
        ({"max_streams": 0}, "max_streams: Input should be greater than or equal to 1"),
        ({"overload_policy": "queue"}, "overload_policy: Input should be 'passthrough' or 'drop'"),
        ({"device": "tpu"}, "device: expected cpu, cuda, cuda:N or mps"),
        ({"half": True}, "half: float16 inference needs a CUDA device"),
        ({"token": "short"}, "token: a bearer token needs at least 16 characters"),
        ({"virtual_camera": "/dev/sda"}, "virtual_camera: expected v4l2:/dev/videoN"),
        ({"model": "/nonexistent/net_g.pth"}, "model: file /nonexistent/net_g.pth does not exist"),
        ({"stun_servers": ["http://x"]}, "stun_servers: expected stun:HOST[:PORT] URLs"),
        ({"pli_interval": 0}, "pli_interval: Input should be greater than or equal to 0.1"),
    ],
)
def test_invalid_value_names_the_field(override: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(**override)
    assert message in str(info.value)


def test_max_streams_is_auto_or_a_count(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.load().max_streams == "auto"
    assert Settings.load(max_streams="Auto").max_streams == "auto"
    assert Settings.load(max_streams=3).max_streams == 3
    monkeypatch.setenv("KFGAN_MAX_STREAMS", "7")
    assert Settings.load().max_streams == 7
    for bad, message in ((0, "greater than or equal to 1"), (257, "less than or equal to 256"),
                         ("many", "valid integer")):
        with pytest.raises(ConfigError, match=rf'^max_streams: Input should be .*{message}.* \(or "auto"\)$'):
            Settings.load(max_streams=bad)


def test_instance_id_is_unique_by_default_and_routable() -> None:
    import re

    first, second = Settings.load().instance_id, Settings.load().instance_id
    assert first != second, "two daemons on one host must not share an id"
    assert re.fullmatch(r"[a-z0-9-]+-[0-9a-f]{6}", first), first  # the short host name, a random suffix
    assert Settings.load(instance_id="media1-8471").instance_id == "media1-8471"
    # The id starts session ids ("<id>.<random>") and is a balancer's server name: no dots, no slashes.
    for bad in ("media1.example", "a/b", "-lead", "", "x" * 64, "media1\n"):
        with pytest.raises(ConfigError, match="^instance_id: "):
            Settings.load(instance_id=bad)


def test_invalid_environment_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFGAN_PORT", "eighty")
    with pytest.raises(ConfigError, match=r"^port: Input should be a valid integer"):
        Settings.load()


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    # A typo must not be silently ignored: "max_stream" would leave the limit at its default.
    config = write(tmp_path, "max_stream = 2\n")
    with pytest.raises(ConfigError, match=r"max_stream: Extra inputs are not permitted"):
        Settings.load(config)


def test_broken_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config: .* is not valid TOML"):
        Settings.load(write(tmp_path, "port = = 1\n"))
    with pytest.raises(ConfigError, match=r"^config: file .* does not exist"):
        Settings.load(tmp_path / "missing.toml")


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    config = write(tmp_path, 'port = -1\nlog_format = "xml"\n')
    with pytest.raises(ConfigError) as info:
        Settings.load(config)
    assert "port:" in str(info.value) and "log_format:" in str(info.value)


def test_values_are_normalised(tmp_path: Path) -> None:
    config = write(tmp_path, 'virtual_camera = "v4l2:/dev/video10"\nlog_level = "DEBUG"\nstun_servers = ["stun:stun.example.org:3478"]\n')
    settings = Settings.load(config)
    assert settings.virtual_camera == "/dev/video10"
    assert settings.log_level == "debug"
    assert settings.stun_servers == ["stun:stun.example.org:3478"]


def test_token_is_secret_in_dumps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFGAN_TOKEN", "0123456789abcdef-secret")
    settings = Settings.load()
    assert settings.token is not None and settings.token.get_secret_value() == "0123456789abcdef-secret"
    assert "secret" not in repr(settings)


def test_restore_settings_carry_the_per_stream_fields() -> None:
    settings = Settings.load(keyframe_store_size=5, keyframe_policy="max_distance", pli_distance_threshold=7.5,
                             detector="cnn", warp_mode="published", redetect_interval=12)
    restore = settings.restore_settings()
    assert (restore.keyframe_store_size, restore.keyframe_policy, restore.pli_distance_threshold) == (5, "max_distance", 7.5)
    assert (restore.detector, restore.warp_mode, restore.redetect_interval) == ("cnn", "published", 12)
