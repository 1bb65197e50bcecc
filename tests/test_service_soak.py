"""A service left running: calls come and go, a worker dies, a caller is killed; nothing leaks or lingers.

- Soak: rounds of four real aiortc callers against ``kfgan-daemon serve`` (a
  separate process, measured through /proc), hanging up between rounds, each
  round measured once the daemon released the heap its calls used.
  Resident memory after the last round stays within 100 MB of the first
  round's (a leak of 5 MB a call would fail it; released this way, the daemon
  grew 33-51 MB by round 6 and 90 MB by round 30, 120 calls), threads come
  back to within 10 of the start, faces are still restored in the last round,
  and the inference worker never failed. Six rounds, about a minute, by
  default; ``KFGAN_SOAK_ROUNDS`` and ``KFGAN_SOAK_SECONDS`` make it longer.
- A killed inference worker comes back; ``/readyz`` says not-ready meanwhile.
- A caller killed with SIGKILL frees its slot within 5 s (never-connected offers: test_service_signalling).
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from test_service_lifecycle import clean_env, wait_ready, write_config
from test_webrtc_loopback import (
    ClientPeer,
    ClipTrack,
    PatternTrack,
    first_face_pictures,
    small_generator,
    start_daemon,
    stop_daemon,
)
from kfgan_daemon.engine import StreamEngine
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.service.app import ServiceState, create_app
from kfgan_daemon.service.config import Settings
from kfgan_daemon.service.metrics import ServiceMetrics
from kfgan_daemon.service.server import engine_settings
from kfgan_daemon.service.sessions import SessionManager

TESTS = Path(__file__).resolve().parent
CALLERS = 4
ROUNDS = int(os.environ.get("KFGAN_SOAK_ROUNDS", "6"))
CALL_SECONDS = float(os.environ.get("KFGAN_SOAK_SECONDS", "4"))
CALLER_FPS = 10
HEAP_RELEASES = "kfgan_heap_release_collect_seconds_count"


class LoggedDaemon:
    """``kfgan-daemon serve`` as a process whose log is read all along (an unread pipe would block it)."""

    def __init__(self, config: Path, port: int = 0, **env: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kfgan_daemon", "serve", "--config", str(config), "--port", str(port)],
            cwd=TESTS.parent, env=clean_env(**env), stderr=subprocess.PIPE, text=True,
        )
        self.log: deque[str] = deque(maxlen=5000)
        self._listening = threading.Event()
        self.url = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._listening.wait(60):
            self.process.kill()
            raise AssertionError(f"the daemon never said where it listens: {''.join(self.log)}")

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            if not self.url and "listening on " in line:
                self.url = line.rsplit("listening on ", 1)[1].strip()
                self._listening.set()

    def stop(self, timeout: float) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._reader.join(5)
        return code


@dataclass
class Sample:
    rss_mb: float
    threads: int


def sample(pid: int) -> Sample:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return Sample(int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"]))


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(f"{url}/metrics") as response:
        text = await response.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def heap_released(http: aiohttp.ClientSession, url: str, before: float) -> None:
    """Wait until the daemon released the heap after the calls that just ended: a release, then none for 2 s."""
    deadline = time.monotonic() + 30
    count = before
    while True:
        await asyncio.sleep(2.0)
        now = await metric(http, url, HEAP_RELEASES)
        if count > before and now == count:
            return
        assert time.monotonic() < deadline, "the daemon did not release the heap 30 s after the calls ended"
        count = now


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_soak_rounds_of_four_callers_leave_nothing_behind(tmp_path: Path, media_dir: Path) -> None:
    pictures, _ = first_face_pictures(media_dir, 50)
    # 320x320: the face stays large enough to detect, and four streams fit on two shared cores.
    pictures = [DecodedFrame.from_av(frame.to_av().reformat(width=320, height=320), frame.index) for frame in pictures]
    # The soak is about calls coming and going, not throughput: 10 frames a second per caller
    # and a lenient deadline leave room for restoration on two shared cores.
    config = write_config(tmp_path, max_streams=CALLERS, max_latency_ms=2000.0, offer_rate_limit="",
                          pli_interval=0.5, log_level="info")
    daemon = await asyncio.to_thread(LoggedDaemon, config)
    samples: list[Sample] = []
    restored_per_round: list[int] = []
    try:
        await wait_ready(daemon.url)
        start = sample(daemon.process.pid)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            for round_number in range(1, ROUNDS + 1):
                clients = [ClientPeer(ClipTrack(pictures, CALLER_FPS)) for _ in range(CALLERS)]
                try:
                    for client in clients:
                        await client.connect(http, daemon.url)
                    await asyncio.gather(*(client.wait_frames(10, timeout=60) for client in clients))
                    await asyncio.sleep(CALL_SECONDS)
                    outcomes: Counter[str] = Counter()
                    for client in clients:
                        async with http.get(f"{daemon.url}/streams/{client.session}") as response:
                            assert response.status == 200, await response.text()
                            for stream in (await response.json())["streams"]:
                                outcomes.update({key: value for key, value in stream["stats"].items() if value})
                    restored = outcomes["restored"]
                    restored_per_round.append(restored)
                    releases = await metric(http, daemon.url, HEAP_RELEASES)
                finally:
                    await asyncio.gather(*(client.close() for client in clients))

                async def sessions() -> int:
                    async with http.get(f"{daemon.url}/streams") as response:
                        return len((await response.json())["sessions"])

                deadline = time.monotonic() + 30
                while await sessions():
                    assert time.monotonic() < deadline, "sessions still open 30 s after every caller hung up"
                    await asyncio.sleep(0.2)
                await heap_released(http, daemon.url, releases)
                samples.append(sample(daemon.process.pid))
                print(f"round {round_number}: {samples[-1].rss_mb:.0f} MB resident, {samples[-1].threads} threads, "
                      f"{restored} frames restored; {dict(outcomes)}", flush=True)
            after_calls = [await metric(http, daemon.url, f"kfgan_heap_release_collect_seconds_{what}")
                           for what in ("count", "sum")]
            full = await metric(http, daemon.url, 'kfgan_gc_pause_seconds_count{generation="2"}')
            print(f"full garbage collections: {full:.0f} in all, {after_calls[0]:.0f} after calls ended "
                  f"({1000 * after_calls[1] / max(after_calls[0], 1):.1f} ms each)", flush=True)
            restarts = await metric(http, daemon.url, "kfgan_engine_inference_restarts_total")
            errors = await metric(http, daemon.url, "kfgan_engine_inference_errors_total")
    finally:
        code = await asyncio.to_thread(daemon.stop, 30)
    log = "".join(daemon.log)
    print(f"start: {start.rss_mb:.0f} MB resident, {start.threads} threads")
    assert code == 0, log
    assert samples[-1].rss_mb - samples[0].rss_mb < 100, samples
    assert samples[-1].threads - start.threads <= 10, (start, samples)
    assert restored_per_round[-1] > 0, restored_per_round
    assert restarts == 0 and errors == 0, log


@pytest.mark.timeout(120)
async def test_a_killed_inference_worker_comes_back_and_readyz_says_so_meanwhile() -> None:
    settings = Settings.load(port=0, offer_rate_limit="")
    metrics = ServiceMetrics()
    engine = StreamEngine(small_generator(settings), engine_settings(settings), registry=metrics.registry)
    await engine.start()
    state = ServiceState(settings=settings, metrics=metrics, sessions=SessionManager(settings, lambda: engine),
                         engine=engine)
    state.set_status("ready")
    client = TestClient(TestServer(create_app(state), host="127.0.0.1"))
    await client.start_server()
    caller = ClientPeer(PatternTrack())
    try:
        assert (await client.get("/readyz")).status == 200
        engine.inference._task.cancel()  # killed on purpose
        await asyncio.sleep(0)
        response = await client.get("/readyz")
        assert response.status == 503
        assert (await response.json())["reason"] == "restarting"
        offer = await caller.offer_sdp()
        refused = await client.post("/offer", json={"sdp": offer, "type": "offer"})
        assert refused.status == 503 and (await refused.json())["reason"] == "not_ready"

        deadline = time.monotonic() + 10
        while (await client.get("/readyz")).status != 200:
            assert time.monotonic() < deadline, "the inference worker did not come back"
            await asyncio.sleep(0.05)
        assert engine.inference.restarts == 1
        caller = ClientPeer(PatternTrack())
        await caller.connect(client.session, str(client.make_url("")).rstrip("/"))
        await caller.wait_frames(10)
        metrics_text = await (await client.get("/metrics")).text()
        assert 'kfgan_engine_inference_restarts_total{device="cpu"} 1.0' in metrics_text
    finally:
        await caller.close()
        await state.sessions.close_all(drain=False)
        await engine.stop(drain=False)
        await client.close()


CALLER = """
import asyncio, sys
sys.path.insert(0, sys.argv[2])
import aiohttp
from test_webrtc_loopback import ClientPeer, PatternTrack

async def main(url):
    client = ClientPeer(PatternTrack())
    async with aiohttp.ClientSession() as http:
        await client.connect(http, url)
    await client.wait_frames(10, timeout=60)
    print("in call", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.timeout(120)
async def test_a_killed_caller_frees_its_slot_within_5_s() -> None:
    daemon = await start_daemon(max_streams=1, offer_rate_limit="")  # the default media_timeout
    caller = subprocess.Popen([sys.executable, "-c", CALLER, daemon.url, str(TESTS)], stdout=subprocess.PIPE,
                              text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(caller.stdout.readline), 60)
        assert line.strip() == "in call"
        assert len((await daemon.get_json("/streams"))["sessions"]) == 1
        caller.send_signal(signal.SIGKILL)  # no BYE, no DTLS close: it is simply gone
        killed = time.monotonic()
        while (await daemon.get_json("/streams"))["sessions"]:
            assert time.monotonic() - killed < 5, "the dead caller still holds its slot after 5 s"
            await asyncio.sleep(0.1)
        print(f"\nslot freed {time.monotonic() - killed:.1f} s after the caller was killed")
        # The slot is really free: a new caller gets in although max_streams is 1.
        client = ClientPeer(PatternTrack())
        try:
            await client.connect(daemon.http, daemon.url)
            await client.wait_frames(5)
        finally:
            await client.close()
    finally:
        caller.kill()
        caller.wait()
        await stop_daemon(daemon)
