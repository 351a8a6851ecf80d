// vgen stream page: speaks the websocket protocol of vgen.stream.protocol (binary server messages:
// 4-byte big-endian header length, JSON header, JPEG payload for frames; JSON text client messages).
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");
const decoder = new TextDecoder();

const state = {
  socket: null,
  streaming: false,
  stream: null,        // number of the current stream (frames of older streams are dropped)
  startedAt: 0,        // performance.now() of the start request
  framesReceived: 0,
  firstFrameMs: null,
  generationFps: null,
  deliveredFps: null,
  framesDrawn: 0,
  queue: [],           // decoded frames waiting to be drawn
  arrivals: [],        // arrival times of recent frames (for the playback pace)
  nextDraw: 0,
  framesPerBlock: 4,
};
window.vgenStats = state;  // read by tests and curious users

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function fmt(value, digits = 1) {
  return value === null || value === undefined || !isFinite(value) ? "-" : value.toFixed(digits);
}

function send(message) {
  if (state.socket && state.socket.readyState === WebSocket.OPEN) {
    state.socket.send(JSON.stringify(message));
  }
}

function unpack(buffer) {
  const view = new DataView(buffer);
  const n = view.getUint32(0, false);
  const header = JSON.parse(decoder.decode(new Uint8Array(buffer, 4, n)));
  return [header, new Uint8Array(buffer, 4 + n)];
}

function setStreaming(on) {
  state.streaming = on;
  $("stop").disabled = !on;
  $("switch").disabled = !on;
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/ws`);
  socket.binaryType = "arraybuffer";
  state.socket = socket;
  socket.onopen = () => { $("connection").textContent = "connected"; $("connection").className = "badge ok"; };
  socket.onclose = (event) => {
    $("connection").textContent = "disconnected";
    $("connection").className = "badge bad";
    setStreaming(false);
    if (event.code === 1013) setStatus("the server is full; reload the page to try again", true);
  };
  socket.onmessage = (event) => {
    if (!(event.data instanceof ArrayBuffer)) return;
    const [header, payload] = unpack(event.data);
    handle(header, payload);
  };
}

function handle(header, payload) {
  switch (header.type) {
    case "hello": {
      state.framesPerBlock = header.model.frames_per_block;
      const modes = new Set(header.cache_modes);
      for (const option of $("cache").options) option.disabled = !modes.has(option.value);
      $("cache").value = header.model.default_cache_mode;
      $("tau").value = header.sdvg.default_tau;
      setStatus(`ready: ${header.model.width}x${header.model.height} frames, blocks of ` +
                `${header.model.frames_per_block}; SDVG drafts with ${header.sdvg.draft_steps} step(s) vs ` +
                `${header.sdvg.target_steps}`);
      break;
    }
    case "started":
      state.stream = header.stream;
      setStreaming(true);
      $("cache-mode").textContent = header.cache_mode;
      $("sdvg-state").textContent = header.sdvg ? `on, tau ${header.tau}` : "off";
      $("current-prompt").textContent = header.prompt;
      setStatus(header.max_frames ? `streaming ${header.max_frames} frames` : "streaming (Stop ends it)");
      break;
    case "frame":
      if (header.stream === state.stream) onFrame(header, payload);
      break;
    case "prompt":
      $("current-prompt").textContent = header.prompt;
      setStatus(`prompt switched from block ${header.from_block}`);
      break;
    case "stopped":
      if (header.stream === state.stream) {
        setStreaming(false);
        setStatus(`stopped (${header.reason}) after ${header.frames} frames`);
      }
      break;
    case "error":
      setStatus(`error (${header.code}): ${header.message}`, true);
      break;
  }
}

function onFrame(header, payload) {
  const now = performance.now();
  state.framesReceived += 1;
  if (state.firstFrameMs === null) state.firstFrameMs = now - state.startedAt;
  state.deliveredFps = state.framesReceived / ((now - state.startedAt) / 1000);
  state.generationFps = header.generation_fps;
  state.arrivals.push(now);
  while (state.arrivals.length > 0 && now - state.arrivals[0] > 3000) state.arrivals.shift();
  $("frames").textContent = String(state.framesReceived);
  $("gen-fps").textContent = fmt(header.generation_fps);
  $("delivered-fps").textContent = fmt(state.deliveredFps);
  $("latency").textContent = `${fmt(state.firstFrameMs, 0)} ms`;
  $("block").textContent = String(header.block);
  if (header.sdvg) {
    const s = header.sdvg;
    const verdict = s.drafted ? (s.accepted ? "draft kept" : "target regenerated") : "target (first block)";
    const rate = s.acceptance_rate === null ? "" : `, acceptance ${(100 * s.acceptance_rate).toFixed(0)}%`;
    $("sdvg-state").textContent = `${verdict}${rate}`;
  }
  const blob = new Blob([payload], { type: "image/jpeg" });
  createImageBitmap(blob).then((bitmap) => {
    state.queue.push(bitmap);
  });
}

// Plays frames at the pace they are generated: the arrival rate of the last seconds, faster when a backlog builds.
function pace() {
  const a = state.arrivals;
  if (a.length < 2) return 8;
  const rate = (a.length - 1) / ((a[a.length - 1] - a[0]) / 1000);
  const backlog = state.queue.length > 2 * state.framesPerBlock ? 1.5 : 1;
  return Math.min(60, Math.max(1, rate * backlog));
}

function draw(now) {
  if (state.queue.length > 0 && now >= state.nextDraw) {
    const bitmap = state.queue.shift();
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    bitmap.close();
    state.framesDrawn += 1;
    state.nextDraw = now + 1000 / pace();
  }
  requestAnimationFrame(draw);
}

$("controls").addEventListener("submit", (event) => {
  event.preventDefault();
  if (state.streaming && event.submitter !== $("start")) {
    send({ type: "set_prompt", prompt: $("prompt").value });
    return;
  }
  state.framesReceived = 0;
  state.firstFrameMs = null;
  state.deliveredFps = null;
  state.queue = [];
  state.arrivals = [];
  state.stream = null;
  state.startedAt = performance.now();
  const tau = parseFloat($("tau").value);
  send({
    type: "start",
    prompt: $("prompt").value,
    cache_mode: $("cache").value,
    sdvg: $("sdvg").checked,
    tau: isFinite(tau) ? tau : null,
    seed: parseInt($("seed").value, 10) || 0,
  });
  setStatus("starting");
});
$("stop").addEventListener("click", () => send({ type: "stop" }));
$("switch").addEventListener("click", () => send({ type: "set_prompt", prompt: $("prompt").value }));
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && state.streaming) {
    event.preventDefault();
    send({ type: "set_prompt", prompt: $("prompt").value });
  }
});

connect();
requestAnimationFrame(draw);
