"""A real browser as the client: Debian's headless Chromium, its fake camera playing a real face clip.

The demo page at ``/`` sends the camera to the daemon and shows what comes
back; the daemon's counters must agree with the browser's ``getStats()``, and
hanging up must free the session. A page on another origin may call the
daemon only when that origin is listed in ``cors_origins``.

Skipped without ``/usr/bin/chromium`` (``apt-get install chromium``; ``.ci/run``
installs it) and without ``../shared/media``.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import av
import pytest
from aiohttp import web

from cdp import CHROMIUM, Browser, Page
from kfgan_daemon.service.server import open_configured_generator
from test_service_http import metric
from test_webrtc_loopback import Daemon, start_daemon, stop_daemon

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no {CHROMIUM} (Debian: apt-get install chromium)"),
]

SIZE, FPS = 512, 25
TOKEN = "browser-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The daemon's frame counters and the browser's are read a few milliseconds apart, after the
# camera stopped sending and both sides stopped moving; see test_demo_page_* for what may differ.
SETTLE_SECONDS = 1.0
# Seconds of call after the first restored frames, so that the reported split is that of a call,
# not of its first second (200 frames at 25 FPS).
CALL_SECONDS = 8.0


@pytest.fixture(scope="module")
def camera_clip(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """d12 (512x512, 25 FPS, a person talking) as the y4m file Chromium's fake camera plays in a loop."""
    path = tmp_path_factory.mktemp("camera") / "d12.y4m"
    with av.open(str(media_dir / "d12.mp4")) as source, av.open(str(path), "w", format="yuv4mpegpipe") as target:
        decoded = source.streams.video[0]
        assert (decoded.width, decoded.height, decoded.average_rate) == (SIZE, SIZE, FPS)
        raw = target.add_stream("rawvideo", rate=FPS)
        raw.width, raw.height, raw.pix_fmt = SIZE, SIZE, "yuv420p"
        for frame in source.decode(decoded):
            target.mux(raw.encode(frame.reformat(format="yuv420p")))
    return path


@pytest.fixture
async def face_browser(camera_clip: Path, tmp_path: Path):
    """Chromium whose camera shows a person talking."""
    started = await Browser.launch(tmp_path / "profile", fake_video=camera_clip)
    yield started
    await started.close()


@pytest.fixture
async def browser(tmp_path: Path):
    """Chromium whose camera is its built-in test pattern (no ../shared needed)."""
    started = await Browser.launch(tmp_path / "profile")
    yield started
    await started.close()


async def counters(page: Page, daemon: Daemon, session: str) -> tuple[dict, dict]:
    """The browser's getStats() figures and the daemon's view of the same stream, read back to back."""
    seen = await page.evaluate("kfganDemo.browserStats()")
    (stream,) = await daemon.streams(session)
    return seen, stream


async def settled(page: Page, daemon: Daemon, session: str, timeout: float = 20.0) -> tuple[dict, dict]:
    """Counters once no frame has moved on either side for SETTLE_SECONDS."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        seen, stream = await counters(page, daemon, session)
        key = (seen.get("framesSent"), seen.get("framesDecoded"), stream["frames_in"], stream["frames_out"],
               stream["stats"]["emitted"])
        if key != last:
            last, since = key, time.monotonic()
        elif time.monotonic() - since >= SETTLE_SECONDS:
            return seen, stream
        assert time.monotonic() < deadline, f"frames still moving after {timeout:.0f} s: {key}"
        await asyncio.sleep(0.1)


@pytest.mark.shared
@pytest.mark.parametrize("codec", ["H264", "VP8"])
async def test_demo_page_restores_the_camera_and_agrees_with_the_browser(
    face_browser: Browser, tmp_path: Path, codec: str
) -> None:
    # The shipped model and default settings: what a person trying the daemon gets.
    daemon = await start_daemon(generator_factory=open_configured_generator, token=TOKEN)
    daemon.headers = AUTH
    try:
        page = await face_browser.new_page(f"{daemon.url}/?autostart=1&codec={codec.lower()}")
        await page.send("Emulation.setDeviceMetricsOverride",
                        {"width": 1000, "height": 1000, "deviceScaleFactor": 1, "mobile": False})

        # ?autostart=1 starts at once; without the token the daemon refuses and the page says why.
        error = await page.wait_for("kfganDemo.state === 'failed' && kfganDemo.error", 20, "the refusal")
        assert "401" in error and "missing bearer token" in error
        assert (await daemon.get_json("/streams"))["sessions"] == []

        # A person types the token and presses Start; it goes in a header, never in the URL.
        await page.evaluate(f"document.getElementById('token').value = {json.dumps(TOKEN)}; "
                            "document.getElementById('start').click(); true")
        session = await page.wait_for("kfganDemo.state === 'connected' && kfganDemo.session", 30, "the connection")
        assert TOKEN not in await page.evaluate("location.href")
        info = await daemon.get_json(f"/streams/{session}")
        # The camera's section (restored video back) and the page's receive-only one (the call as received).
        assert info["codecs"] == [f"video/{codec}"] * 2

        # Restored frames come back, at the camera's size, and the page shows the daemon's figures.
        # How many are restored depends on the machine (issue 8); that some are, does not.
        deadline = time.monotonic() + 40
        while (stream := (await daemon.streams(session))[0])["frames_out_by_outcome"].get("restored", 0) < 3:
            assert time.monotonic() < deadline, f"fewer than 3 restored frames sent in 40 s: {stream}"
            await asyncio.sleep(0.2)
        await page.wait_for("document.getElementById('restored-frames').textContent !== '–' && "
                            "kfganDemo.daemon !== null", 5, "the daemon's figures on the page")
        seen = await page.evaluate("kfganDemo.browserStats()")
        assert (seen["receivedWidth"], seen["receivedHeight"]) == (SIZE, SIZE)
        assert seen["receivedCodec"] == f"video/{codec}"
        await asyncio.sleep(CALL_SECONDS / 2)
        size = await page.screenshot(tmp_path / f"demo-{codec}.png")
        assert size > 50_000  # two 512x512 videos and the tables, not a blank page
        await asyncio.sleep(CALL_SECONDS / 2)

        # Stop the camera, let both sides settle, and compare the counts.
        await page.evaluate("kfganDemo.pc.getSenders()[0].replaceTrack(null).then(() => true)")
        seen, stream = await settled(page, daemon, session)
        stats, sent_as = stream["stats"], stream["frames_out_by_outcome"]
        split = {"restored": sent_as.get("restored", 0), "carried_forward": sent_as.get("carried_forward", 0)}
        split["passed_through"] = stream["frames_out"] - sum(split.values())
        print(f"\n{codec}: browser sent {seen['framesSent']}, decoded {seen['framesDecoded']} "
              f"(dropped {seen['framesDropped']}); daemon received {stream['frames_in']} "
              f"(dropped on receive {stream['receive_dropped']}, by the engine {stats['dropped']}, "
              f"{stats['output_overflow']} outputs overtaken), sent {stream['frames_out']}: {split} "
              f"({sent_as}); added latency p50/p95 "
              f"{stream['latency_p50_ms']:.0f}/{stream['latency_p95_ms']:.0f} ms")
        # Every frame the engine handed out was sent, or overtaken by a newer one when the sender fell behind.
        assert sum(sent_as.values()) == stream["frames_out"] == stats["emitted"] - stats["output_overflow"]
        # Loopback loses no packets, so what the browser sent the daemon received, and every frame
        # the daemon sent the browser decoded, or counted as dropped when its decoder fell behind
        # (it does on a busy machine). Slack: the daemon's decoder starts at the first complete
        # picture, so a frame or two the browser sent before the connection settled may not count
        # (one in every run so far), and an encoder may skip a frame under its rate control
        # (none seen so far): 3 and 2 frames, not a percentage, since neither grows with the call.
        assert seen["packetsLost"] == 0
        assert 0 <= seen["framesSent"] - stream["frames_in"] <= 3
        assert 0 <= stream["frames_out"] - (seen["framesDecoded"] + seen["framesDropped"]) <= 2

        # Hanging up frees the session at once.
        await page.evaluate("document.getElementById('hangup').click(); true")
        await page.wait_for("kfganDemo.state === 'idle'", 10, "the page to hang up")
        assert (await daemon.get_json("/streams"))["sessions"] == []
        async with daemon.http.get(f"{daemon.url}/metrics", headers=AUTH) as response:
            text = await response.text()
        assert metric(text, "kfgan_webrtc_sessions") == 0
        assert metric(text, "kfgan_engine_streams_open") == 0
    finally:
        await stop_daemon(daemon)


# The camera's cap in the test below, and how long its sending rate is averaged over.
CAP_KBPS = 150
RATE_WINDOW_SECONDS = 6.0


@pytest.mark.shared
async def test_demo_page_at_150_kbits_shows_the_call_as_received_and_restored(
    face_browser: Browser, tmp_path: Path
) -> None:
    daemon = await start_daemon(generator_factory=open_configured_generator)
    try:
        page = await face_browser.new_page(f"{daemon.url}/?autostart=1&bitrate={CAP_KBPS}")
        await page.send("Emulation.setDeviceMetricsOverride",
                        {"width": 1280, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
        session = await page.wait_for("kfganDemo.state === 'connected' && kfganDemo.session", 30, "the connection")
        assert await page.evaluate("kfganDemo.cameraCap()") == CAP_KBPS * 1000
        assert await page.evaluate("document.getElementById('bitrate').value") == str(CAP_KBPS)

        # Both views play the camera's 512x512 picture: the call as the daemon received it, and restored.
        playing = ("['received', 'restored'].every((id) => { const v = document.getElementById(id); "
                   "return v.readyState >= 2 && !v.paused && v.videoWidth === 512 && v.currentTime > 1; })")
        await page.wait_for(playing, 40, "the received and the restored views to play")
        deadline = time.monotonic() + 40
        while (stream := (await daemon.streams(session))[0])["frames_out_by_outcome"].get("restored", 0) < 3:
            assert time.monotonic() < deadline, f"fewer than 3 restored frames sent in 40 s: {stream}"
            await asyncio.sleep(0.2)

        # The page says what the daemon's plan is for this call, in words.
        await page.wait_for("document.getElementById('cadence').textContent !== '–'", 10, "the plan's cadence")
        cadence = await page.evaluate("document.getElementById('cadence').textContent")
        reason = await page.evaluate("document.getElementById('cadence-reason').textContent")
        assert cadence == "every frame" or cadence.startswith("1 frame in "), cadence
        assert reason != "–", reason
        print(f"\nthe page's plan: restoring {cadence}: {reason}")

        # The browser's own stats: what its camera's sender put on the wire over a few seconds.
        before = await page.evaluate("kfganDemo.browserStats()")
        times = await page.evaluate("['received', 'restored'].map((id) => document.getElementById(id).currentTime)")
        await asyncio.sleep(RATE_WINDOW_SECONDS)
        after = await page.evaluate("kfganDemo.browserStats()")
        # Bytes over milliseconds: kbit/s, payload only (the cap is the encoder's, headers come on top).
        sent_kbps = 8 * (after["bytesSent"] - before["bytesSent"]) / (after["sentAt"] - before["sentAt"])
        print(f"\ncamera sent {sent_kbps:.0f} kbit/s under a {CAP_KBPS} kbit/s cap (encoder target "
              f"{after.get('targetBitrate')}); views decoded {after['viewFramesDecoded']} received, "
              f"{after['framesDecoded']} restored frames")
        assert 0.3 * CAP_KBPS < sent_kbps <= CAP_KBPS
        assert after["targetBitrate"] <= CAP_KBPS * 1000
        # Both views keep going.
        assert after["viewFramesDecoded"] > before["viewFramesDecoded"] + RATE_WINDOW_SECONDS * 5
        assert after["framesDecoded"] > before["framesDecoded"] + RATE_WINDOW_SECONDS * 5
        assert (after["viewWidth"], after["viewHeight"]) == (SIZE, SIZE)
        later = await page.evaluate("['received', 'restored'].map((id) => document.getElementById(id).currentTime)")
        assert all(b > a + RATE_WINDOW_SECONDS / 2 for a, b in zip(times, later)), (times, later)

        shot = tmp_path / f"demo-{CAP_KBPS}kbps.png"
        assert await page.screenshot(shot) > 100_000  # three 512x512 videos and the tables
        print(f"screenshot: {shot}")
    finally:
        await stop_daemon(daemon)


async def test_closing_the_tab_frees_the_session(browser: Browser) -> None:
    daemon = await start_daemon()
    try:
        page = await browser.new_page(f"{daemon.url}/?autostart=1")
        session = await page.wait_for("kfganDemo.state === 'connected' && kfganDemo.session", 30, "the connection")
        assert [s["id"] for s in (await daemon.get_json("/streams"))["sessions"]] == [session]
        await page.close()
        # The page hangs up as it goes (a keepalive DELETE on pagehide) and the browser closes the
        # connection: the slot is free at once, not after the daemon's dead-caller timeout.
        deadline = time.monotonic() + 5
        while (await daemon.get_json("/streams"))["sessions"]:
            assert time.monotonic() < deadline, "the session outlived its tab by 5 s"
            await asyncio.sleep(0.05)
    finally:
        await stop_daemon(daemon)


# A page on another origin that calls the daemon the way an integrator's page would.
CALLER_PAGE = """<!doctype html><meta charset="utf-8"><title>caller</title><script>
async function connectTo(base, token) {
  const auth = token ? {Authorization: `Bearer ${token}`} : {};
  const result = {};
  result.readyz = (await fetch(`${base}/readyz`)).status;
  const camera = await navigator.mediaDevices.getUserMedia({video: true});
  const pc = new RTCPeerConnection();
  pc.addTransceiver(camera.getVideoTracks()[0], {direction: "sendrecv"});
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && resolve();
  });
  const offer = await fetch(`${base}/offer`, {
    method: "POST", headers: {...auth, "Content-Type": "application/json"},
    body: JSON.stringify({sdp: pc.localDescription.sdp, type: "offer"}),
  });
  result.offer = offer.status;
  result.location = offer.headers.get("Location");
  const answer = await offer.json();
  await pc.setRemoteDescription({type: answer.type, sdp: answer.sdp});
  await new Promise((resolve) => {
    if (pc.connectionState === "connected") return resolve();
    pc.onconnectionstatechange = () => pc.connectionState === "connected" && resolve();
  });
  result.inspect = (await fetch(`${base}/streams/${answer.session}`, {headers: auth})).status;
  result.hangUp = (await fetch(`${base}/streams/${answer.session}`, {method: "DELETE", headers: auth})).status;
  pc.close();
  camera.getTracks().forEach((track) => track.stop());
  return result;
}

async function outcome(request) {
  try { return (await request).status; } catch (error) { return error.name; }
}

async function probe(base, offerSdp) {
  return {
    readyz: await outcome(fetch(`${base}/readyz`)),
    jsonOffer: await outcome(fetch(`${base}/offer`, {method: "POST", headers: {"Content-Type": "application/json"},
                                                     body: JSON.stringify({sdp: offerSdp, type: "offer"})})),
    // What any page may send without a preflight; the answer is opaque to it.
    plainOffer: (await fetch(`${base}/offer`, {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
                                                body: JSON.stringify({sdp: offerSdp, type: "offer"})})).type,
  };
}
</script>"""


async def test_page_on_another_origin_is_allowed_only_when_listed(browser: Browser) -> None:
    site = web.Application()

    async def caller(request: web.Request) -> web.Response:
        return web.Response(text=CALLER_PAGE, content_type="text/html")

    site.router.add_get("/", caller)
    runner = web.AppRunner(site)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
    listed = await start_daemon(token=TOKEN, cors_origins=[origin])
    listed.headers = AUTH
    unlisted = await start_daemon()
    try:
        page = await browser.new_page(f"{origin}/")
        result = await page.evaluate(f"connectTo({json.dumps(listed.url)}, {json.dumps(TOKEN)})", timeout=40)
        assert result["readyz"] == 200 and result["offer"] == 200
        assert result["location"].startswith("/streams/")  # exposed to the page
        assert result["inspect"] == 200 and result["hangUp"] == 200
        assert (await listed.get_json("/streams"))["sessions"] == []

        # Not listed: the page can read nothing, its JSON offer never gets past the preflight,
        # and the offer it may send without one (text/plain) is refused with 415.
        offer_sdp = await page.evaluate(
            "(async () => { const pc = new RTCPeerConnection(); pc.addTransceiver('video');"
            " await pc.setLocalDescription(await pc.createOffer()); const sdp = pc.localDescription.sdp;"
            " pc.close(); return sdp; })()")
        result = await page.evaluate(f"probe({json.dumps(unlisted.url)}, {json.dumps(offer_sdp)})")
        assert result == {"readyz": "TypeError", "jsonOffer": "TypeError", "plainOffer": "opaque"}
        assert (await unlisted.get_json("/streams"))["sessions"] == []
        async with unlisted.http.get(f"{unlisted.url}/metrics") as response:
            text = await response.text()
        assert metric(text, "kfgan_http_request_errors_total", route="/offer", reason="unsupported_media_type") == 1
        assert metric(text, "kfgan_webrtc_offers_total", result="answered") == 0
    finally:
        await stop_daemon(listed)
        await stop_daemon(unlisted)
        await runner.cleanup()


async def test_the_page_offers_again_when_its_session_is_gone(browser: Browser) -> None:
    daemon = await start_daemon()
    try:
        page = await browser.new_page(f"{daemon.url}/?autostart=1")
        first = await page.wait_for("kfganDemo.state === 'connected' && kfganDemo.session", 30, "the connection")
        # The session goes away without the page hanging up (here an admin's DELETE; behind a
        # balancer also a daemon that died, whose sessions another daemon answers 404 for): the
        # page's next poll sees it gone and offers the call again to the same URL.
        async with daemon.http.delete(f"{daemon.url}/streams/{first}") as response:
            assert response.status == 200
        again = f"kfganDemo.state === 'connected' && kfganDemo.session !== {json.dumps(first)} && kfganDemo.session"
        second = await page.wait_for(again, 30, "the call offered again")
        assert await page.evaluate("kfganDemo.reoffers") == 1
        assert [s["id"] for s in (await daemon.get_json("/streams"))["sessions"]] == [second]
    finally:
        await stop_daemon(daemon)
