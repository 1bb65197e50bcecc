"""The daemon as a process: systemd notifications, watchdog pings, SIGTERM draining, config errors."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from test_webrtc_loopback import ClientPeer, PatternTrack

ROOT = Path(__file__).resolve().parent.parent
SERVER = [sys.executable, "-m", "kfgan_daemon", "serve"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("KFGAN_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.update(extra)
    return env


def write_config(tmp_path: Path, **values) -> Path:
    lines = [f"{key} = {value!r}".replace("'", '"') if isinstance(value, str) else f"{key} = {str(value).lower()}"
             for key, value in values.items()]
    path = tmp_path / "kfgan.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class DaemonProcess:
    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [*SERVER, "--config", str(config), "--port", "0"],
            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
        )
        self.log: list[str] = []
        self.url = self._wait_listening()

    def _wait_listening(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        assert self.process.stderr is not None
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                raise AssertionError(f"daemon exited early ({self.process.wait()}): {''.join(self.log)}")
            self.log.append(line)
            if "listening on " in line:
                return line.rsplit("listening on ", 1)[1].strip()
        raise AssertionError("daemon never said where it listens")

    def finish(self, timeout: float) -> tuple[int, str]:
        try:
            _, rest = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, rest = self.process.communicate()
            raise AssertionError(f"daemon still running {timeout} s after SIGTERM: {''.join(self.log)}{rest}")
        return self.process.returncode, "".join(self.log) + rest

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


async def wait_ready(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while time.monotonic() < deadline:
            async with http.get(f"{url}/readyz") as response:
                if response.status == 200:
                    return
            await asyncio.sleep(0.1)
    raise AssertionError("daemon never became ready")


class NotifyListener:
    """Plays systemd's side of $NOTIFY_SOCKET, reading every datagram as it comes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read)

    def _read(self) -> None:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return

    def count(self, text: str) -> int:
        return sum(text in message for message in self.messages)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


@pytest.fixture
async def notify(tmp_path: Path):
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


@pytest.mark.slow
async def test_sigterm_drains_a_live_stream_and_exits_0(tmp_path: Path, notify: NotifyListener) -> None:
    config = write_config(tmp_path, drain_timeout=2.0, log_level="info")
    env = clean_env(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="200000")
    daemon = DaemonProcess(config, env)
    client = ClientPeer(PatternTrack())
    try:
        await wait_ready(daemon.url)
        async with aiohttp.ClientSession() as http:
            await client.connect(http, daemon.url)
        await client.wait_frames(10)
        await asyncio.sleep(0.5)
        assert notify.count("READY=1") == 1, notify.messages
        # WATCHDOG_USEC=0.2 s: pings every 0.1 s from the event loop.
        assert notify.count("WATCHDOG=1") >= 3

        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        code, log = await asyncio.to_thread(daemon.finish, 15)
        assert code == 0, log
        assert time.monotonic() - started < 10
        assert "draining 1 session(s)" in log and "stopped" in log
        await asyncio.sleep(0.1)
        assert notify.count("STOPPING=1") == 1
        await asyncio.sleep(0.5)
        frames = len(client.frames)
        await asyncio.sleep(0.5)
        assert len(client.frames) == frames, "frames still arriving from a stopped daemon"
    finally:
        await client.close()
        daemon.kill()


@pytest.mark.slow
async def test_a_stalled_service_manager_never_blocks_the_daemon(tmp_path: Path) -> None:
    # Nobody reads this socket: its queue fills within a few pings. The daemon
    # must drop notifications rather than block its event loop on them.
    unread = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    unread.bind(str(tmp_path / "stalled.sock"))
    env = clean_env(NOTIFY_SOCKET=str(tmp_path / "stalled.sock"), WATCHDOG_USEC="20000")
    daemon = DaemonProcess(write_config(tmp_path), env)
    try:
        await wait_ready(daemon.url, timeout=60)
        await asyncio.sleep(1.0)  # about 100 more pings into a full queue
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async with http.get(f"{daemon.url}/healthz") as response:
                assert response.status == 200
        daemon.process.send_signal(signal.SIGINT)
        code, log = await asyncio.to_thread(daemon.finish, 10)
        assert code == 0, log
    finally:
        daemon.kill()
        unread.close()


@pytest.mark.parametrize(
    ("config_text", "env", "message"),
    [
        ("port = 70000\n", {}, "port: Input should be less than or equal to 65535"),
        ("", {"KFGAN_MAX_STREAMS": "0"}, "max_streams: Input should be greater than or equal to 1"),
        ('overload_policy = "queue"\n', {}, "overload_policy: Input should be 'passthrough' or 'drop'"),
    ],
)
def test_invalid_config_exits_2_naming_the_field(tmp_path: Path, config_text: str, env: dict, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(config_text)
    result = subprocess.run(
        [*SERVER, "--config", str(config)], cwd=ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_exits_1_with_a_message(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    # An explicit checkpoint that is not a model: the daemon must say so and stop, not hang half-started.
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    result = subprocess.run(
        [*SERVER, "--config", str(config), "--port", "0"], cwd=ROOT, env=clean_env(KFGAN_MODEL=str(bogus)),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert str(bogus) in result.stderr or "model" in result.stderr.lower()
    assert "Traceback" not in result.stderr
