"""Several daemons as one service: the shipped HAProxy config in front of three real daemons on loopback.

Real HAProxy (``systemd/haproxy.cfg``, only its addresses and privileges
changed), three ``kfgan-daemon serve`` processes with the lite model and
``max_streams = 2``, and real aiortc callers whose offers and follow-ups all
go through HAProxy. It shows: calls spread over the instances, restored faces
come back from each, the caller beyond the cluster's capacity gets a clean
503, ``DELETE /streams/{id}`` hangs up the right call on the right instance,
``kill -9`` takes an instance out of rotation within 2 s and its caller
re-offers onto a survivor, SIGTERM drains another (no new calls, its live
ones go on until they hang up, exit 0), the killed one restarted takes calls
again, and the sessions counted in the daemons' ``/metrics`` are the live calls.
Skipped where ``haproxy`` is not installed (``.ci/run`` installs it).
"""
from __future__ import annotations

import asyncio
import csv
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiortc import RTCSessionDescription
from aiortc.contrib.media import MediaRelay

from clips import synthetic_picture
from test_service_http import metric
from test_service_lifecycle import write_config
from test_service_soak import LoggedDaemon
from test_webrtc_loopback import ClientPeer, ClipTrack, first_face_pictures
from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.service.config import Settings
from kfgan_daemon.service.server import longest_stop

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "systemd" / "haproxy.cfg"
SINGLE_UNIT = ROOT / "systemd" / "kfgan-daemon.service"
INSTANCE_UNIT = ROOT / "systemd" / "kfgan-daemon@.service"
HAPROXY = shutil.which("haproxy")
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy; .ci/run installs it)"
)
INSTANCES = ("kfgan-a", "kfgan-b", "kfgan-c")
MAX_STREAMS = 2
DRAIN_TIMEOUT = 30.0


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def balancer_config(frontend: int, servers: dict[str, int], stats: Path) -> str:
    """The shipped config with this test's addresses, run as whoever runs the suite (no chroot or user)."""
    text = SHIPPED.read_text()
    lines = "".join(f"    server {name} 127.0.0.1:{port}\n" for name, port in servers.items())
    for pattern, replacement, count in (
        (r"^    bind 127\.0\.0\.1:8470$", f"    bind 127.0.0.1:{frontend}", 1),
        (r"^    stats socket \S+", f"    stats socket {stats}", 1),
        (r"^    (chroot|user|group) .*\n", "", 3),
        (r"(^    server .*\n)+", lines, 1),
    ):
        text, found = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        assert found == count, f"{SHIPPED} no longer has {pattern!r} {count} time(s)"
    return text


def haproxy(stats: Path, command: str) -> str:
    """One command on HAProxy's stats socket, and its answer."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(stats))
        sock.sendall(f"{command}\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode()


def backend_stats(stats: Path) -> dict[str, dict[str, str]]:
    """The kfgan backend's rows of ``show stat`` by server name (and BACKEND)."""
    rows = csv.DictReader(haproxy(stats, "show stat").lstrip("# ").splitlines())
    return {row["svname"]: row for row in rows if row["pxname"] == "kfgan"}


def server_states(stats: Path) -> dict[str, str]:
    """Each daemon's health as HAProxy sees it (UP, DOWN, DOWN 1/2, ...)."""
    return {name: row["status"] for name, row in backend_stats(stats).items() if name in INSTANCES}


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float, what: str) -> float:
    """Seconds until ``check()`` holds, polled every 50 ms."""
    start = time.monotonic()
    while True:
        result = check()
        if result if isinstance(result, bool) else await result:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"not within {timeout:.0f} s: {what}"
        await asyncio.sleep(0.05)


def owner(session: str) -> str:
    return session.split(".", 1)[0]


async def call(http: aiohttp.ClientSession, url: str, caller: ClientPeer) -> str:
    """Offer through the balancer; the answer says where the session lives."""
    offer = {"sdp": await caller.offer_sdp(), "type": "offer"}
    async with http.post(f"{url}/offer", json=offer) as response:
        body = await response.json()
        assert response.status == 200, body
        assert response.headers["Location"] == f"/streams/{body['session']}"
    caller.session = body["session"]
    await caller.pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
    return caller.session


async def sessions_of(http: aiohttp.ClientSession, daemon: LoggedDaemon) -> set[str]:
    async with http.get(f"{daemon.url}/streams") as response:
        return {session["id"] for session in (await response.json())["sessions"]}


async def counted_sessions(http: aiohttp.ClientSession, daemons: list[LoggedDaemon]) -> float:
    total = 0.0
    for daemon in daemons:
        async with http.get(f"{daemon.url}/metrics") as response:
            total += metric(await response.text(), "kfgan_webrtc_sessions")
    return total


def hung_up(caller: ClientPeer) -> bool:
    return caller.pc.connectionState in ("closed", "failed") or (caller._reader is not None and caller._reader.done())


@needs_haproxy
def test_the_shipped_haproxy_config_is_valid() -> None:
    result = subprocess.run([HAPROXY, "-c", "-f", str(SHIPPED)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    # Follow-ups are routed by server name, so the names must be what the template makes the instance ids.
    for name, port in re.findall(r"^    server (\S+) \S+:(\d+)$", SHIPPED.read_text(), flags=re.MULTILINE):
        assert name.endswith(f"-{port}") and Settings.load(instance_id=name).instance_id == name


def test_the_instance_unit_is_the_single_unit_with_a_port_and_an_id() -> None:
    def settings(path: Path) -> list[str]:
        return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]

    single, instance = settings(SINGLE_UNIT), settings(INSTANCE_UNIT)
    per_instance = ("Description=", "ExecStart=", "Environment=", "StateDirectory=", "CacheDirectory=")
    # The hardening and restart policy must not drift apart.
    assert [line for line in single if not line.startswith(per_instance)] == \
           [line for line in instance if not line.startswith(per_instance)]
    assert "Environment=KFGAN_INSTANCE_ID=%l-%i" in instance
    assert any(line.startswith("ExecStart=") and line.endswith(" --port %i") for line in instance)
    # systemd kills a daemon that takes longer than TimeoutStopSec to drain and stop.
    (timeout,) = [float(line.split("=", 1)[1]) for line in instance if line.startswith("TimeoutStopSec=")]
    assert timeout >= longest_stop(Settings.load(ROOT / "systemd" / "kfgan-daemon.toml"))


@needs_haproxy
@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.timeout(300)
async def test_three_daemons_behind_haproxy(tmp_path: Path, media_dir: Path) -> None:
    faces, _ = first_face_pictures(media_dir, 50)
    # 320x320 at 10 FPS: the face stays detectable and three daemons restore it on two shared cores.
    faces = [DecodedFrame.from_av(frame.to_av().reformat(width=320, height=320), frame.index) for frame in faces]
    # Callers that only fill slots send a small pattern with no face: cheap for everyone.
    pattern = [DecodedFrame.from_rgb(synthetic_picture(i, 160, 128), ColourSpace("bt601")) for i in range(10)]
    config = write_config(tmp_path, model=str(ROOT / "models" / "kfgan-lite.safetensors"), max_streams=MAX_STREAMS,
                          max_latency_ms=2000.0, pli_interval=0.5, offer_rate_limit="", drain_timeout=DRAIN_TIMEOUT,
                          log_level="info")
    frontend, *ports = free_ports(1 + len(INSTANCES))
    servers = dict(zip(INSTANCES, ports))
    stats = tmp_path / "haproxy.sock"
    (tmp_path / "haproxy.cfg").write_text(balancer_config(frontend, servers, stats))

    def start(name: str) -> LoggedDaemon:
        return LoggedDaemon(config, port=servers[name], KFGAN_INSTANCE_ID=name)

    daemons = dict(zip(INSTANCES, await asyncio.gather(*(asyncio.to_thread(start, name) for name in INSTANCES))))
    balancer_log = (tmp_path / "haproxy.log").open("w")
    balancer = subprocess.Popen([HAPROXY, "-db", "-f", str(tmp_path / "haproxy.cfg")], stdout=balancer_log,
                                stderr=subprocess.STDOUT)
    lb = f"http://127.0.0.1:{frontend}"
    callers: list[ClientPeer] = []
    # Each connection gets its own view of a caller's camera, as README's aiortc client does:
    # a track that fed a closed connection does not feed a new one.
    relay = MediaRelay()

    def caller(camera: ClipTrack) -> ClientPeer:
        callers.append(ClientPeer(relay.subscribe(camera, buffered=False)))
        return callers[-1]

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            await eventually(lambda: stats.exists() and set(server_states(stats).values()) == {"UP"}, 90,
                             "HAProxy to see all three daemons ready")

            # Calls spread over the instances, and each sends restored faces back. The follow-up
            # GETs go through HAProxy and are answered by the daemon that owns the call.
            cameras = [ClipTrack(faces, 10) for _ in INSTANCES]
            speakers = [caller(camera) for camera in cameras]
            for speaker in speakers:
                await call(http, lb, speaker)
            assert sorted(owner(s.session) for s in speakers) == sorted(INSTANCES)

            async def restored(speaker: ClientPeer) -> bool:
                async with http.get(f"{lb}/streams/{speaker.session}") as response:
                    info = await response.json()
                assert response.status == 200 and info["id"] == speaker.session, info
                return info["streams"][0]["frames_out_by_outcome"].get("restored", 0) >= 3

            for speaker in speakers:
                await eventually(lambda: restored(speaker), 60, f"restored frames from {owner(speaker.session)}")

            # Two calls each fill the cluster; then a caller gets a clean 503 and nothing is created for it.
            fillers = [caller(ClipTrack(pattern, 5)) for _ in INSTANCES]
            for filler in fillers:
                await call(http, lb, filler)
            spread = Counter(owner(c.session) for c in speakers + fillers)
            assert spread == {name: MAX_STREAMS for name in INSTANCES}
            refused = caller(ClipTrack(pattern, 5))
            offer = {"sdp": await refused.offer_sdp(), "type": "offer"}
            # Full daemons leave rotation: HAProxy answers for them, as they would.
            await eventually(lambda: all(s.startswith("DOWN") for s in server_states(stats).values()), 5,
                             "HAProxy to take the full daemons out")
            async with http.post(f"{lb}/offer", json=offer) as response:
                assert response.status == 503 and int(response.headers["Retry-After"]) > 0
                assert (await response.json())["reason"] == "capacity"
            # An offer that reaches a full daemon before its health check tells HAProxy (here: checks
            # paused, every daemon put back in rotation) is refused and sent on to each other one in turn.
            for name in INSTANCES:
                haproxy(stats, f"disable health kfgan/{name}")
                haproxy(stats, f"set server kfgan/{name} health up")
            async with http.post(f"{lb}/offer", json=offer) as response:
                assert response.status == 503 and int(response.headers["Retry-After"]) > 0
                assert (await response.json())["reason"] == "capacity"
            for name, daemon in daemons.items():
                async with http.get(f"{daemon.url}/metrics") as metrics:
                    text = await metrics.text()
                assert metric(text, "kfgan_http_request_errors_total", route="/offer", reason="capacity") >= 1, name
                haproxy(stats, f"enable health kfgan/{name}")
            redispatched = int(backend_stats(stats)["BACKEND"]["wredis"])
            assert await counted_sessions(http, list(daemons.values())) == 6

            # DELETE through HAProxy hangs up that call on its own instance and nothing else.
            for filler in fillers:
                async with http.delete(f"{lb}/streams/{filler.session}") as response:
                    assert response.status == 200 and (await response.json()) == {"closed": filler.session}
            for name, daemon in daemons.items():
                assert await sessions_of(http, daemon) == {s.session for s in speakers if owner(s.session) == name}
            await eventually(lambda: all(hung_up(f) for f in fillers), 15, "the fillers to see the hang-up")
            await eventually(lambda: set(server_states(stats).values()) == {"UP"}, 10, "all three back in rotation")

            # kill -9 of an instance that holds a call: out of rotation within 2 s; its caller sees the
            # video stop for a second, re-offers through HAProxy as README says and lands on a survivor.
            killed = daemons[INSTANCES[0]]
            orphan = next(s for s in speakers if owner(s.session) == INSTANCES[0])
            camera = cameras[speakers.index(orphan)]
            killed.process.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            failover = await eventually(lambda: server_states(stats)[INSTANCES[0]].startswith("DOWN"), 5,
                                        "HAProxy to take the killed daemon out")
            assert failover < 2.0, failover
            await eventually(lambda: time.monotonic() - orphan.frames[-1].at > 1.0, 10, "the orphan's video to stop")
            await orphan.close()
            orphan.source.stop()
            reoffered = caller(camera)  # the same camera, a new connection
            await call(http, lb, reoffered)
            assert owner(reoffered.session) != INSTANCES[0]
            await reoffered.wait_frames(5)
            reoffer_seconds = time.monotonic() - killed_at
            killed.process.wait(10)

            # SIGTERM drains another: out of rotation, no new call lands there, its live calls go on
            # until their callers hang up (one through HAProxy, which still routes to it), exit 0.
            draining = daemons[INSTANCES[1]]
            held = [c for c in callers if c.session and owner(c.session) == INSTANCES[1] and not hung_up(c)]
            draining.process.send_signal(signal.SIGTERM)
            drain_started = time.monotonic()

            async def says_draining() -> bool:
                async with http.get(f"{draining.url}/readyz") as response:
                    return response.status == 503 and (await response.json())["reason"] == "draining"

            await eventually(says_draining, 5, "/readyz to say draining")
            await eventually(lambda: server_states(stats)[INSTANCES[1]].startswith("DOWN"), 5,
                             "HAProxy to take the draining daemon out")
            newcomer = caller(ClipTrack(pattern, 5))
            async with http.post(f"{lb}/offer", json={"sdp": await newcomer.offer_sdp(), "type": "offer"}) as response:
                body = await response.json()
                assert response.status in (200, 503), body
            if response.status == 200:
                assert owner(body["session"]) == INSTANCES[2]
                newcomer.session = body["session"]
                await newcomer.pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
            before = [len(c.frames) for c in held]
            await asyncio.sleep(1.0)
            assert all(len(c.frames) > n for c, n in zip(held, before)), "live calls stopped while draining"
            async with http.delete(f"{lb}/streams/{held[0].session}") as response:
                assert response.status == 200, await response.text()
            for other in held[1:]:
                await other.close()
            code = await asyncio.to_thread(draining.process.wait, DRAIN_TIMEOUT)
            drain_seconds = time.monotonic() - drain_started
            assert code == 0, "".join(draining.log)
            assert "every call ended while draining" in "".join(draining.log)

            # The killed instance, restarted under its name, is back in rotation and takes a call
            # (the third instance is full by now, so it is the only one that can).
            restarted_at = time.monotonic()
            daemons[INSTANCES[0]] = await asyncio.to_thread(start, INSTANCES[0])
            rejoin = await eventually(lambda: server_states(stats)[INSTANCES[0]] == "UP", 60,
                                      "HAProxy to see the restarted daemon")
            late = caller(ClipTrack(pattern, 5))
            await call(http, lb, late)
            assert owner(late.session) == INSTANCES[0]
            await late.wait_frames(5)

            # What the surviving daemons count is what is live.
            survivors = [daemons[INSTANCES[0]], daemons[INSTANCES[2]]]
            live = {c.session for c in callers if c.session and owner(c.session) != INSTANCES[1] and not hung_up(c)}
            assert set().union(*[await sessions_of(http, d) for d in survivors]) == live
            assert await counted_sessions(http, survivors) == len(live)
            print(f"\ncalls per instance with the cluster full: {dict(sorted(spread.items()))} ({redispatched} "
                  f"redispatches of refused offers); killed instance "
                  f"out of rotation after {failover:.2f} s, its caller's re-offer sending video again "
                  f"{reoffer_seconds:.1f} s after the kill; drained in {drain_seconds:.1f} s (SIGTERM to exit 0, "
                  f"{len(held)} live call(s) hung up by their callers after 1 s of draining); restarted instance "
                  f"in rotation {rejoin:.1f} s after it listened ({time.monotonic() - restarted_at:.1f} s after its "
                  f"start, with a call)")
    finally:
        await asyncio.gather(*(c.close() for c in callers), return_exceptions=True)
        for peer in callers:
            peer.source.stop()
        codes = {name: await asyncio.to_thread(d.stop, 30) for name, d in daemons.items() if d.process.poll() is None}
        balancer.terminate()
        balancer.wait(10)
        balancer_log.close()
    assert set(codes.values()) <= {0}, codes
