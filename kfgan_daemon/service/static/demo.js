// kfgan-daemon demo page: the camera goes to POST /offer, capped at the bitrate picked (so that it
// arrives compressed, as a call on a poor link does); on the same connection the daemon sends back
// the restored video, and on a second, receive-only section the video as it received it. The
// daemon's own counters (GET /streams/<id>) are shown beside the browser's.
//
// window.kfganDemo exposes the page's state for kiosks and tests: state, session, error, the latest
// daemon figures, start(), hangUp(), browserStats(), cameraCap() (bit/s, 0: unlimited) and reoffers
// (calls offered again after the daemon holding one was gone).
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
    transceivers: null,
    start,
    hangUp,
    browserStats,
    cameraCap,
    reoffers: 0,
  };
  window.kfganDemo = demo;
  let poller = null;
  // Offers made again in a row without a connection; past MAX_REOFFERS the page gives up.
  const MAX_REOFFERS = 3;
  let reoffersInARow = 0;
  // Set while a call is being offered again: the poll and the connection may both see it go.
  let reoffering = false;
  // The previous outbound reading, for the camera's bitrate over the last poll.
  let lastSent = null;

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

  // The camera's bitrate cap in bit/s, 0 for none.
  function cameraCap() {
    return 1000 * Number($("bitrate").value);
  }

  // ?bitrate=N (kbit/s; 0 or "unlimited": no cap), added to the choices when it is not one of them.
  function chooseBitrate(text) {
    const kbps = text === "unlimited" ? 0 : Number(text);
    if (!Number.isFinite(kbps) || kbps < 0) return;
    const value = String(Math.round(kbps));
    const select = $("bitrate");
    if (![...select.options].some((option) => option.value === value)) {
      select.add(new Option(`${value} kbit/s`, value));
    }
    select.value = value;
  }

  // A cap changed during a call applies at once: the sender's encoder follows its parameters.
  async function applyBitrate() {
    const sender = demo.transceivers && demo.transceivers.camera.sender;
    if (!sender) return;
    const parameters = sender.getParameters();
    if (!parameters.encodings || parameters.encodings.length === 0) return;
    if (cameraCap() > 0) parameters.encodings[0].maxBitrate = cameraCap();
    else delete parameters.encodings[0].maxBitrate;
    await sender.setParameters(parameters);
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
      const cap = cameraCap();
      const transceiver = pc.addTransceiver(camera.getVideoTracks()[0], {
        direction: "sendrecv",
        streams: [camera],
        sendEncodings: [cap > 0 ? { maxBitrate: cap } : {}],
      });
      preferCodec(transceiver, $("codec").value);
      // Receive only: the daemon sends the call on it as it received it, decoded and not restored.
      const view = pc.addTransceiver("video", { direction: "recvonly" });
      preferCodec(view, $("codec").value);
      demo.transceivers = { camera: transceiver, received: view };
      pc.addEventListener("track", (event) => {
        $(event.transceiver === view ? "received" : "restored").srcObject = new MediaStream([event.track]);
      });
      pc.addEventListener("connectionstatechange", () => {
        if (pc !== demo.pc) return;
        if (pc.connectionState === "connected") {
          reoffersInARow = 0;
          setState("connected");
        }
        if (pc.connectionState === "failed") reoffer("the connection to the daemon failed");
      });
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

  // Offer the call again from a fresh camera and connection, to the same URL: behind a balancer
  // (systemd/haproxy.cfg, a Kubernetes Service) a daemon that can take it answers.
  async function reoffer(why) {
    if (reoffering) return;
    reoffering = true;
    try {
      await hangUp();
      if (reoffersInARow >= MAX_REOFFERS) {
        fail(why);
        return;
      }
      reoffersInARow += 1;
      demo.reoffers += 1;
      await start();
    } finally {
      reoffering = false;
    }
  }

  async function hangUp() {
    clearInterval(poller);
    poller = null;
    const { pc, session, camera } = demo;
    demo.pc = null;
    demo.session = null;
    demo.camera = null;
    demo.transceivers = null;
    lastSent = null;
    if (session) {
      // Tell the daemon first, so the slot is free at once rather than when it notices the silence.
      await api("DELETE", `streams/${session}`).catch(() => {});
    }
    if (pc) pc.close();
    if (camera) camera.getTracks().forEach((track) => track.stop());
    $("camera").srcObject = null;
    $("received").srcObject = null;
    $("restored").srcObject = null;
    setState("idle", session ? `hung up ${session}` : undefined);
  }

  async function browserStats() {
    const stats = {};
    if (!demo.pc || !demo.transceivers) return stats;
    const report = await demo.pc.getStats();
    const viewTrack = demo.transceivers.received.receiver.track.id;
    report.forEach((entry) => {
      if (entry.kind !== "video" && entry.type !== "candidate-pair") return;
      if (entry.type === "outbound-rtp") {
        stats.framesEncoded = entry.framesEncoded;
        stats.framesSent = entry.framesSent;
        stats.sentWidth = entry.frameWidth;
        stats.sentHeight = entry.frameHeight;
        stats.sentFps = entry.framesPerSecond;
        stats.sentCodec = report.get(entry.codecId)?.mimeType;
        stats.bytesSent = entry.bytesSent;
        stats.sentAt = entry.timestamp;
        stats.targetBitrate = entry.targetBitrate;
      } else if (entry.type === "inbound-rtp" && entry.trackIdentifier === viewTrack) {
        // The call as the daemon received it.
        stats.viewFramesDecoded = entry.framesDecoded;
        stats.viewWidth = entry.frameWidth;
        stats.viewHeight = entry.frameHeight;
        stats.viewCodec = report.get(entry.codecId)?.mimeType;
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

  // The daemon's plan for this call, in words: how many of its frames it sets out to restore.
  function cadence(plan) {
    if (!plan) return "–";
    if (plan.cadence <= 1.05) return "every frame";
    const percent = (100 * plan.restored_share).toFixed(0);
    return `1 frame in ${plan.cadence.toFixed(1)} (${percent}% of frames; the others carry the last restoration)`;
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
        show("cadence", cadence(stream.plan));
        show("cadence-reason", stream.plan ? stream.plan.reason : "–");
        show("keyframes-stored", stream.keyframes_stored);
        show("pli-sent", stream.pli_sent);
        $("latency").textContent = `${ms(stream.latency_p50_ms)} / ${ms(stream.latency_p95_ms)}`;
      }
    } catch (error) {
      // The session is gone: its daemon hung up (admin DELETE, drain, timeout), or died and a balancer
      // sent this poll to another daemon, which does not know it.
      if (String(error.message).includes(" 404:")) {
        if (session === demo.session) await reoffer(`the daemon closed session ${session}`);
        return;
      }
      $("status").textContent = `${demo.state}: ${error.message}`;
    }
    const b = await browserStats();
    let sentKbps;
    if (lastSent && b.sentAt > lastSent.sentAt) {
      sentKbps = (8 * (b.bytesSent - lastSent.bytesSent)) / (b.sentAt - lastSent.sentAt);
    }
    if (b.sentAt !== undefined) lastSent = { bytesSent: b.bytesSent, sentAt: b.sentAt };
    const cap = cameraCap() > 0 ? `${cameraCap() / 1000} kbit/s` : "none";
    show("sent-bitrate", sentKbps === undefined ? undefined : `${sentKbps.toFixed(0)} kbit/s (${cap})`);
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
  $("bitrate").addEventListener("change", () => {
    applyBitrate().catch((error) => {
      $("status").textContent = `${demo.state}: the bitrate cap was refused (${error.message})`;
    });
  });
  // Closing the tab: keepalive lets the hang-up outlive the page.
  window.addEventListener("pagehide", () => {
    if (demo.session) {
      fetch(`streams/${demo.session}`, { method: "DELETE", headers: requestHeaders(false), keepalive: true });
    }
  });

  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  const codec = CODECS[(params.get("codec") || "").toLowerCase()];
  if (codec) $("codec").value = codec;
  if (params.has("bitrate")) chooseBitrate(params.get("bitrate"));
  setState("idle");
  if (params.get("autostart") === "1") start();
})();
