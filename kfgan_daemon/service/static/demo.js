// kfgan-daemon demo page: the camera goes to POST /offer, the restored video comes back on the
// same connection, and the daemon's own counters (GET /streams/<id>) are shown beside the browser's.
//
// window.kfganDemo exposes the page's state for kiosks and tests: state, session, error, the latest
// daemon figures, start(), hangUp() and browserStats().
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const CODECS = { h264: "video/H264", vp8: "video/VP8" };
  const POLL_MS = 1000;
  // Kept for this tab only, so that a reload (or ?autostart=1) needs no retyping; never put in a URL.
  const TOKEN_KEY = "kfgan-daemon-token";

  const demo = {
    state: "idle",
    session: null,
    error: null,
    daemon: null,
    pc: null,
    camera: null,
    start,
    hangUp,
    browserStats,
  };
  window.kfganDemo = demo;
  let poller = null;

  function setState(state, detail) {
    demo.state = state;
    document.body.dataset.state = state;
    $("status").textContent = detail ? `${state}: ${detail}` : state;
    const busy = state !== "idle" && state !== "failed";
    $("start").disabled = busy;
    $("hangup").disabled = !busy;
    $("codec").disabled = busy;
  }

  function fail(error) {
    demo.error = String(error && error.message ? error.message : error);
    setState("failed", demo.error);
  }

  function requestHeaders(json) {
    const headers = {};
    if (json) headers["Content-Type"] = "application/json";
    const token = $("token").value.trim();
    if (token) headers["Authorization"] = `Bearer ${token}`;
    return headers;
  }

  async function api(method, path, body, extra = {}) {
    const response = await fetch(path, {
      method,
      headers: requestHeaders(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      ...extra,
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const why = data.error || response.statusText;
      throw new Error(`${method} /${path} answered ${response.status}: ${why}`);
    }
    return data;
  }

  function preferCodec(transceiver, mimeType) {
    const codecs = RTCRtpReceiver.getCapabilities("video").codecs.filter((c) => c.mimeType === mimeType);
    if (codecs.length === 0) throw new Error(`this browser cannot send ${mimeType}`);
    transceiver.setCodecPreferences(codecs);
  }

  // aiortc takes every ICE candidate in the offer (no trickle), so the offer waits for gathering to end.
  function iceGathered(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const check = () => {
        if (pc.iceGatheringState === "complete") {
          pc.removeEventListener("icegatheringstatechange", check);
          resolve();
        }
      };
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  async function start() {
    if (demo.pc) return;
    demo.error = null;
    setState("starting", "asking for the camera");
    try {
      if (!navigator.mediaDevices) {
        throw new Error("the camera needs a secure context: open this page on https:// or http://localhost");
      }
      const token = $("token").value.trim();
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      const camera = await navigator.mediaDevices.getUserMedia({
        video: { width: { ideal: 512 }, height: { ideal: 512 }, frameRate: { ideal: 25 } },
        audio: false,
      });
      demo.camera = camera;
      $("camera").srcObject = camera;

      const pc = new RTCPeerConnection();
      demo.pc = pc;
      pc.addEventListener("track", (event) => {
        $("restored").srcObject = new MediaStream([event.track]);
      });
      pc.addEventListener("connectionstatechange", () => {
        if (pc !== demo.pc) return;
        if (pc.connectionState === "connected") setState("connected");
        if (pc.connectionState === "failed") {
          hangUp().then(() => fail("the connection to the daemon failed"));
        }
      });
      const transceiver = pc.addTransceiver(camera.getVideoTracks()[0], { direction: "sendrecv", streams: [camera] });
      preferCodec(transceiver, $("codec").value);
      // The daemon restores faces: fewer frames hurt less than fewer pixels.
      const sending = transceiver.sender.getParameters();
      sending.degradationPreference = "maintain-resolution";
      await transceiver.sender.setParameters(sending).catch(() => {});

      setState("starting", "sending the offer");
      await pc.setLocalDescription(await pc.createOffer());
      await iceGathered(pc);
      const answer = await api("POST", "offer", { sdp: pc.localDescription.sdp, type: "offer" });
      if (pc !== demo.pc) return;
      demo.session = answer.session;
      $("session").textContent = `session ${answer.session}`;
      await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
      setState("connecting");
      poller = setInterval(refresh, POLL_MS);
    } catch (error) {
      await hangUp();
      fail(error);
    }
  }

  async function hangUp() {
    clearInterval(poller);
    poller = null;
    const { pc, session, camera } = demo;
    demo.pc = null;
    demo.session = null;
    demo.camera = null;
    if (session) {
      // Tell the daemon first, so the slot is free at once rather than when it notices the silence.
      await api("DELETE", `streams/${session}`).catch(() => {});
    }
    if (pc) pc.close();
    if (camera) camera.getTracks().forEach((track) => track.stop());
    $("camera").srcObject = null;
    $("restored").srcObject = null;
    setState("idle", session ? `hung up ${session}` : undefined);
  }

  async function browserStats() {
    const stats = {};
    if (!demo.pc) return stats;
    const report = await demo.pc.getStats();
    report.forEach((entry) => {
      if (entry.kind !== "video" && entry.type !== "candidate-pair") return;
      if (entry.type === "outbound-rtp") {
        stats.framesEncoded = entry.framesEncoded;
        stats.framesSent = entry.framesSent;
        stats.sentWidth = entry.frameWidth;
        stats.sentHeight = entry.frameHeight;
        stats.sentFps = entry.framesPerSecond;
        stats.sentCodec = report.get(entry.codecId)?.mimeType;
      } else if (entry.type === "inbound-rtp") {
        stats.framesReceived = entry.framesReceived;
        stats.framesDecoded = entry.framesDecoded;
        stats.framesDropped = entry.framesDropped;
        stats.keyFramesDecoded = entry.keyFramesDecoded;
        stats.packetsLost = entry.packetsLost;
        stats.receivedWidth = entry.frameWidth;
        stats.receivedHeight = entry.frameHeight;
        stats.receivedFps = entry.framesPerSecond;
        stats.receivedCodec = report.get(entry.codecId)?.mimeType;
      } else if (entry.type === "candidate-pair" && entry.nominated && entry.state === "succeeded") {
        stats.roundTripMs = entry.currentRoundTripTime === undefined ? undefined : 1000 * entry.currentRoundTripTime;
      }
    });
    return stats;
  }

  const show = (id, value) => {
    $(id).textContent = value === undefined || value === null ? "–" : String(value);
  };
  const ms = (value) => (value === null || value === undefined ? "–" : `${value.toFixed(0)} ms`);

  function share(count, total) {
    return total > 0 ? `${count} (${((100 * count) / total).toFixed(0)}%)` : String(count);
  }

  async function refresh() {
    const session = demo.session;
    if (!session) return;
    try {
      const info = await api("GET", `streams/${session}`);
      if (session !== demo.session) return;
      demo.daemon = info;
      const stream = info.streams[0];
      if (stream && stream.stats) {
        // What this browser was sent, by what the daemon did to each frame.
        const sentAs = (outcome) => (stream.frames_out_by_outcome || {})[outcome] || 0;
        const sent = stream.frames_out;
        const passed = sent - sentAs("restored") - sentAs("carried_forward");
        show("restored-frames", share(sentAs("restored"), sent));
        show("carried-frames", share(sentAs("carried_forward"), sent));
        show("passed-frames", share(passed, sent));
        show("no-face-frames", sentAs("no_face"));
        show("no-keyframe-frames", sentAs("no_keyframe"));
        show("shed-frames", sentAs("shed"));
        show("dropped-frames", (stream.receive_dropped || 0) + stream.stats.dropped + stream.stats.output_overflow);
        show("keyframes-stored", stream.keyframes_stored);
        show("pli-sent", stream.pli_sent);
        $("latency").textContent = `${ms(stream.latency_p50_ms)} / ${ms(stream.latency_p95_ms)}`;
      }
    } catch (error) {
      // The daemon hung up (admin DELETE, timeout, shutdown): the session is gone.
      if (String(error.message).includes(" 404:")) {
        await hangUp();
        fail(`the daemon closed session ${session}`);
        return;
      }
      $("status").textContent = `${demo.state}: ${error.message}`;
    }
    const b = await browserStats();
    show("codec-used", b.receivedCodec || b.sentCodec);
    show("frames-sent", b.framesSent);
    show("frames-decoded", b.framesDecoded);
    show("received-format", b.receivedWidth
      ? `${b.receivedWidth}×${b.receivedHeight} at ${(b.receivedFps || 0).toFixed(0)} FPS`
      : undefined);
    show("round-trip", b.roundTripMs === undefined ? undefined : ms(b.roundTripMs));
  }

  $("controls").addEventListener("submit", (event) => {
    event.preventDefault();
    start();
  });
  $("hangup").addEventListener("click", () => hangUp());
  // Closing the tab: keepalive lets the hang-up outlive the page.
  window.addEventListener("pagehide", () => {
    if (demo.session) {
      fetch(`streams/${demo.session}`, { method: "DELETE", headers: requestHeaders(false), keepalive: true });
    }
  });

  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  const codec = CODECS[(params.get("codec") || "").toLowerCase()];
  if (codec) $("codec").value = codec;
  setState("idle");
  if (params.get("autostart") === "1") start();
})();
