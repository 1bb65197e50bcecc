"""The HTTP control plane over a real socket: health, readiness, metrics, tokens, limits and bad input.

Every rejected request gets a JSON error and is counted, and a live stream
keeps flowing through all of it.
"""
from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from test_webrtc_loopback import ClientPeer, PatternTrack, start_daemon, stop_daemon

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.match(rf"^{re.escape(name)}(\{{(.*)\}})? (\S+)$", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(match.group(3))
    return 0.0


@pytest.fixture
async def daemon():
    started = await start_daemon(token=TOKEN, max_streams=2, max_request_bytes=8192)
    started.headers = AUTH
    yield started
    await stop_daemon(started)


async def metrics_text(daemon) -> str:
    async with daemon.http.get(f"{daemon.url}/metrics", headers=AUTH) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return await response.text()


async def post_offer(daemon, body, headers=AUTH) -> tuple[int, dict]:
    if isinstance(body, (bytes, str)):
        kwargs = {"data": body}
        headers = {**headers, "Content-Type": "application/json"}
    else:
        kwargs = {"json": body}
    async with daemon.http.post(f"{daemon.url}/offer", headers=headers, **kwargs) as response:
        return response.status, await response.json()


async def test_probes_need_no_token_and_report_state(daemon) -> None:
    async with daemon.http.get(f"{daemon.url}/healthz") as response:
        assert response.status == 200 and (await response.json()) == {"status": "ok"}
    # Open to balancers, so without the token it says what a balancer needs and nothing more.
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}):
        async with daemon.http.get(f"{daemon.url}/readyz", headers=headers) as response:
            assert response.status == 200 and (await response.json()) == {"status": "ready"}
    async with daemon.http.get(f"{daemon.url}/readyz", headers=AUTH) as response:
        body = await response.json()
        assert response.status == 200 and body["status"] == "ready"
        assert body["model"]["architecture"] == "LiteGenerator" and body["model"]["device"] == "cpu"
        assert body["model"]["path"] == "built in code"  # the test daemon's generator comes from no file
        assert (body["streams"], body["capacity"], body["capacity_in_use"]) == (0, 2, 0.0)
        instance = body["instance_id"]
    text = await metrics_text(daemon)
    assert metric(text, "kfgan_ready") == 1
    assert metric(text, "kfgan_model_info", architecture="LiteGenerator") == 1
    assert metric(text, "kfgan_instance_info", instance_id=instance) == 1
    assert metric(text, "kfgan_capacity_streams") == 2  # max_streams = 2
    assert "kfgan_capacity_in_use_ratio 0.0" in text
    # The engine's metrics are served on the same registry.
    assert "kfgan_engine_streams_open" in text


async def test_readyz_names_the_model_file_it_loaded() -> None:
    from kfgan_daemon.restore.model_choice import resolve_model_path
    from kfgan_daemon.service.server import open_configured_generator

    started = await start_daemon(generator_factory=open_configured_generator, token=TOKEN)
    try:
        async with started.http.get(f"{started.url}/readyz", headers=AUTH) as response:
            body = await response.json()
        assert response.status == 200
        assert body["model"]["path"] == str(resolve_model_path(None).resolve())
        assert body["model"]["path"].endswith(".safetensors")
    finally:
        await stop_daemon(started)


@pytest.mark.parametrize(
    ("headers", "message"),
    [({}, "missing bearer token"), ({"Authorization": "Bearer wrong-token-0123456789"}, "wrong bearer token"),
     ({"Authorization": f"Basic {TOKEN}"}, "wrong bearer token")],
)
async def test_token_is_required(daemon, headers: dict, message: str) -> None:
    for method, path in (("POST", "/offer"), ("GET", "/streams"), ("GET", "/metrics"), ("DELETE", "/streams/s1")):
        async with daemon.http.request(method, f"{daemon.url}{path}", headers=headers, json={}) as response:
            assert response.status == 401, path
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await response.json()) == {"error": message, "reason": "unauthorized"}
    text = await metrics_text(daemon)
    assert metric(text, "kfgan_http_request_errors_total", route="/offer", reason="unauthorized") == 1
    assert metric(text, "kfgan_http_request_errors_total", route="/streams/{id}", reason="unauthorized") == 1


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b"this is not json", 400, "bad_json"),
        ({"sdp": "v=0", "type": "answer"}, 400, "bad_offer"),
        ({"type": "offer"}, 400, "bad_offer"),
        ({"sdp": "hello, I am not an SDP", "type": "offer"}, 400, "bad_sdp"),
        ({"sdp": "v=0\r\nm=video x\r\n", "type": "offer"}, 400, "bad_sdp"),
        ({"sdp": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", "type": "offer"}, 400, "no_video"),
        (
            {"sdp": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
                    "c=IN IP4 0.0.0.0\r\na=rtpmap:96 VP8/90000\r\n", "type": "offer"},
            400, "bad_sdp",
        ),
    ],
)
async def test_bad_offers_get_a_clear_json_error(daemon, body, status: int, reason: str) -> None:
    code, answer = await post_offer(daemon, body)
    assert code == status and answer["reason"] == reason
    assert answer["error"]  # a sentence a person can act on
    text = await metrics_text(daemon)
    assert metric(text, "kfgan_http_request_errors_total", route="/offer", reason=reason) == 1
    assert metric(text, "kfgan_webrtc_offers_total", result="rejected") == 1
    assert (await daemon.get_json("/streams"))["sessions"] == []


async def test_oversized_request_is_refused_with_413(daemon) -> None:
    big = {"sdp": "v=0\r\n" + "a=x\r\n" * 4000, "type": "offer"}
    code, answer = await post_offer(daemon, big)
    assert code == 413 and answer["reason"] == "too_large"
    assert "max_request_bytes=8192" in answer["error"]

    async def chunks():
        # No Content-Length: the limit must hold while the body streams in.
        for _ in range(40):
            yield b"x" * 1024

    streamed = {**AUTH, "Content-Type": "application/json"}
    async with daemon.http.post(f"{daemon.url}/offer", headers=streamed, data=chunks()) as response:
        assert response.status == 413
    text = await metrics_text(daemon)
    assert metric(text, "kfgan_http_request_errors_total", route="/offer", reason="too_large") == 2


async def test_unknown_paths_and_methods_are_json_errors(daemon) -> None:
    async with daemon.http.get(f"{daemon.url}/nope", headers=AUTH) as response:
        assert response.status == 404 and (await response.json())["reason"] == "not_found"
    async with daemon.http.get(f"{daemon.url}/offer", headers=AUTH) as response:
        assert response.status == 405 and "POST" in response.headers["Allow"]
    async with daemon.http.get(f"{daemon.url}/streams/s999", headers=AUTH) as response:
        assert response.status == 404 and "s999" in (await response.json())["error"]
    async with daemon.http.delete(f"{daemon.url}/streams/s999", headers=AUTH) as response:
        assert response.status == 404


async def test_stream_limit_and_bad_input_leave_live_streams_running(daemon) -> None:
    first, second = ClientPeer(PatternTrack()), ClientPeer(PatternTrack(), codec="video/VP8")
    third = ClientPeer(PatternTrack())
    try:
        await first.connect(daemon.http, daemon.url, headers=AUTH)
        await second.connect(daemon.http, daemon.url, headers=AUTH)
        await first.wait_frames(10)
        await second.wait_frames(10)

        # max_streams = 2: readiness says so before anyone is refused, and the third caller is told
        # to come back later, with nothing created for it.
        async with daemon.http.get(f"{daemon.url}/readyz") as response:
            assert response.status == 503 and (await response.json()) == {"status": "not_ready", "reason": "full"}
        assert metric(await metrics_text(daemon), "kfgan_capacity_in_use_ratio") == 1.0
        async with daemon.http.post(f"{daemon.url}/offer", headers=AUTH,
                                    json={"sdp": await third.offer_sdp(), "type": "offer"}) as response:
            assert response.status == 503 and (await response.json())["reason"] == "capacity"
            assert int(response.headers["Retry-After"]) > 0
        assert len((await daemon.get_json("/streams"))["sessions"]) == 2

        # A barrage of bad requests while two streams are live.
        before = (len(first.frames), len(second.frames))
        barrage = [
            (b"{", AUTH, 400),
            ({"sdp": "garbage", "type": "offer"}, AUTH, 400),
            ({"sdp": "v=0\r\n" + "a=x\r\n" * 4000, "type": "offer"}, AUTH, 413),
            ({"sdp": "v=0", "type": "offer"}, {"Authorization": "Bearer nope"}, 401),
        ]
        for body, headers, status in barrage:
            assert (await post_offer(daemon, body, headers=headers))[0] == status
        await asyncio.sleep(1.0)
        assert len(first.frames) > before[0] + 10 and len(second.frames) > before[1] + 10

        listing = await daemon.get_json("/streams")
        assert sorted(s["id"] for s in listing["sessions"]) == sorted([first.session, second.session])
        async with daemon.http.get(f"{daemon.url}/healthz") as response:
            assert response.status == 200

        # Hanging one up frees its slot for the caller who was refused.
        async with daemon.http.delete(f"{daemon.url}/streams/{first.session}", headers=AUTH) as response:
            assert response.status == 200
        async with daemon.http.get(f"{daemon.url}/readyz") as response:
            assert response.status == 200
        await third.connect(daemon.http, daemon.url, headers=AUTH)
        await third.wait_frames(5)
        text = await metrics_text(daemon)
        assert metric(text, "kfgan_webrtc_sessions") == 2
        assert metric(text, "kfgan_http_request_errors_total", route="/offer", reason="capacity") == 1
        assert metric(text, "kfgan_webrtc_offers_total", result="answered") == 3
    finally:
        for peer in (first, second, third):
            await peer.close()


async def test_readiness_is_503_while_the_model_loads() -> None:
    import threading

    from kfgan_daemon.service.config import Settings
    from kfgan_daemon.service.server import run_server
    from test_webrtc_loopback import small_generator

    release = threading.Event()

    def slow_generator(settings: Settings):
        release.wait(20)
        return small_generator(settings)

    stop = asyncio.Event()
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(run_server(Settings.load(port=0), stop=stop, on_listening=listening.set_result,
                                            generator_factory=slow_generator))
    try:
        url = await asyncio.wait_for(asyncio.shield(listening), 20)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/healthz") as response:
                assert response.status == 200
            async with http.get(f"{url}/readyz") as response:
                assert response.status == 503
                body = await response.json()
                assert (body["status"], body["reason"], body["detail"]) == ("not_ready", "loading", "loading the model")
            caller = ClientPeer(PatternTrack())
            try:
                offer = {"sdp": await caller.offer_sdp(), "type": "offer"}
                async with http.post(f"{url}/offer", json=offer) as response:
                    assert response.status == 503 and (await response.json())["reason"] == "not_ready"
                    assert response.headers["Retry-After"]
            finally:
                await caller.close()
            release.set()
            for _ in range(200):
                async with http.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.05)
            assert response.status == 200
    finally:
        release.set()
        stop.set()
        await asyncio.wait_for(task, 30)
