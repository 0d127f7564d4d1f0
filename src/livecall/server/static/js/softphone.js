// The browser softphone: the microphone becomes a Twilio Media Stream to /ws/softphone
// (connected, start, 20 ms μ-law media frames, marks, stop), and the agent's audio plays back
// with barge-in (`clear`). Audio work happens in softphone-worklet.js; this file only moves
// messages between the worklet, the socket and the page.
const lc = window.livecall;
const $ = (id) => document.getElementById(id);
const phone = $("phone");
const callButton = $("call-button");
const hangupButton = $("hangup-button");
const statusLine = $("phone-status");
const transcript = $("softphone-transcript");
const wireLog = $("wire-log");

const muteButton = $("mute-button");
const keypad = $("keypad");
const timer = $("call-timer");
const recordLink = $("record-link");

let call = null; // the call in progress
let lastSid = null; // whose transcript is shown
const SERVER_DOWN = "The livecall server cannot be reached. Check that it is running, then try again.";
const SILENCE = new Uint8Array(160).fill(0xff); // 20 ms of μ-law silence, sent while muted

function randomHex(bytes) {
  const raw = crypto.getRandomValues(new Uint8Array(bytes));
  return Array.from(raw, (b) => b.toString(16).padStart(2, "0")).join("");
}

function setState(state, text) {
  phone.dataset.state = state;
  statusLine.textContent = text;
  const busy = state === "connecting" || state === "in-call";
  callButton.disabled = busy;
  hangupButton.disabled = !busy;
  muteButton.disabled = state !== "in-call";
  for (const key of keypad.querySelectorAll("button")) key.disabled = state !== "in-call";
  $("profile").disabled = busy;
  $("voice-processing").disabled = busy;
}

function wire(text) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
  wireLog.prepend(li);
  while (wireLog.children.length > 40) wireLog.lastElementChild.remove();
}

function toBase64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i++) s += String.fromCharCode(bytes[i]);
  return btoa(s);
}

function fromBase64(text) {
  const s = atob(text);
  const bytes = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
  return bytes;
}

class Call {
  constructor(profile) {
    this.profile = profile;
    this.callSid = null; // the server names the call when it hands out its token
    this.token = null;
    this.streamSid = `MZ${randomHex(16)}`;
    this.seq = 0;
    this.chunk = 0;
    this.counts = { mediaIn: 0, marksIn: 0, marksOut: 0, clears: 0 };
    this.ended = false;
    this.muted = false;
    this.opened_ = false;
  }

  /** The line's own clock, from the moment the server took the call. */
  startTimer() {
    const t0 = performance.now();
    const tick = () => {
      const s = Math.floor((performance.now() - t0) / 1000);
      timer.textContent = `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
    };
    tick();
    this.timer = setInterval(tick, 1000);
  }

  setMuted(muted) {
    this.muted = muted;
    muteButton.setAttribute("aria-pressed", String(muted));
    muteButton.textContent = muted ? "Unmute" : "Mute";
    wire(muted ? "microphone muted (silence is sent)" : "microphone on");
  }

  /** A key pressed: the same `dtmf` message Twilio sends for a caller's keypad. */
  dtmf(digit) {
    this.send("dtmf", { dtmf: { track: "inbound_track", digit } });
    wire("→ dtmf");
  }

  send(event, body) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
    const message = { event, sequenceNumber: String(++this.seq), streamSid: this.streamSid, ...body };
    this.ws.send(JSON.stringify(message));
  }

  async start(voiceProcessing) {
    this.media = await navigator.mediaDevices.getUserMedia({
      audio: {
        channelCount: 1,
        echoCancellation: voiceProcessing,
        noiseSuppression: voiceProcessing,
        autoGainControl: voiceProcessing,
      },
    });
    this.ctx = new AudioContext({ latencyHint: "interactive" });
    try {
      await this.ctx.audioWorklet.addModule("/static/js/softphone-worklet.js");
    } catch {
      throw new Error(SERVER_DOWN); // the worklet comes from the server: it is not there
    }
    this.node = new AudioWorkletNode(this.ctx, "softphone", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      channelCount: 1,
      channelCountMode: "explicit",
    });
    this.ctx.createMediaStreamSource(this.media).connect(this.node);
    this.node.connect(this.ctx.destination);
    this.node.port.onmessage = (event) => this.fromWorklet(event.data);
    await this.ctx.resume();

    // A short-lived token for this one call, minted from the signed-in session (the page
    // never holds an API token); the `start` below carries it like Twilio's <Parameter>s.
    let answer;
    try {
      answer = await lc.post("/softphone/token");
    } catch {
      throw new Error(SERVER_DOWN);
    }
    if (lc.signedOut(answer)) throw new Error("signed out: taking you to the login page");
    if (!answer.ok) throw new Error(`no call token (HTTP ${answer.status}): sign in again`);
    ({ callSid: this.callSid, token: this.token } = await answer.json());
    lastSid = this.callSid;

    const scheme = location.protocol === "https:" ? "wss" : "ws";
    this.ws = new WebSocket(`${scheme}://${location.host}/ws/softphone`);
    this.ws.onopen = () => this.opened();
    this.ws.onmessage = (event) => this.fromServer(event.data);
    this.ws.onclose = (event) => {
      if (!this.opened_) this.finish(SERVER_DOWN, "error");
      else if (event.code === 1000) this.finish("Call ended.");
      else if (event.code === 1006) this.finish("The connection to the server was lost: the call ended.", "error");
      else this.finish(`Call ended (the server closed the line, code ${event.code}).`);
    };
    this.ws.onerror = () => wire("socket error");
  }

  opened() {
    this.opened_ = true;
    this.startTimer();
    // What Twilio sends first: `connected` (no sequence number, no streamSid), then `start`.
    this.ws.send(JSON.stringify({ event: "connected", protocol: "Call", version: "1.0.0" }));
    this.send("start", {
      start: {
        streamSid: this.streamSid,
        callSid: this.callSid,
        tracks: ["inbound"],
        customParameters: { profile: this.profile, from: "softphone", lc_token: this.token },
        mediaFormat: { encoding: "audio/x-mulaw", sampleRate: 8000, channels: 1 },
      },
    });
    wire(`→ start ${this.callSid}${this.profile ? ` (${this.profile})` : ""}`);
    $("call-sid").textContent = this.callSid;
    this.node.port.postMessage({ type: "start" });
    setState("in-call", "In call: speak now.");
  }

  fromWorklet(msg) {
    if (msg.type === "frame") {
      this.chunk += 1;
      this.send("media", {
        media: {
          track: "inbound",
          chunk: String(this.chunk),
          timestamp: String((this.chunk - 1) * 20),
          payload: toBase64(this.muted ? SILENCE.subarray(0, msg.bytes.length) : msg.bytes),
        },
      });
    } else if (msg.type === "played") {
      this.counts.marksOut += 1;
      this.send("mark", { mark: { name: msg.name } });
    } else if (msg.type === "level") {
      $("mic-level").value = this.muted ? 0 : Math.min(1, msg.mic * 4);
      $("agent-level").value = Math.min(1, msg.agent * 4);
    }
  }

  fromServer(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      wire("← a frame that is not JSON (ignored)");
      return;
    }
    if (msg.streamSid !== this.streamSid) {
      wire(`← ${msg.event} for another stream (ignored)`);
      return;
    }
    if (msg.event === "media") {
      this.counts.mediaIn += 1;
      const bytes = fromBase64(msg.media.payload);
      this.node.port.postMessage({ type: "play", bytes }, [bytes.buffer]);
    } else if (msg.event === "mark") {
      this.counts.marksIn += 1;
      this.node.port.postMessage({ type: "mark", name: msg.mark.name });
    } else if (msg.event === "clear") {
      this.counts.clears += 1;
      this.node.port.postMessage({ type: "clear" });
      wire("← clear (barge-in: playback dropped)");
    } else {
      wire(`← ${msg.event}`);
    }
  }

  hangUp() {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.send("stop", { stop: { callSid: this.callSid } });
      wire("→ stop");
      this.ws.close(1000, "hang up");
    }
    this.finish("Call ended.");
  }

  finish(text, state = "idle") {
    if (this.ended) return;
    this.ended = true;
    clearInterval(this.timer);
    const c = this.counts;
    wire(`media in ${c.mediaIn} · media out ${this.chunk} · marks ${c.marksIn}/${c.marksOut} · clears ${c.clears}`);
    if (this.node) this.node.port.postMessage({ type: "stop" });
    if (this.media) for (const track of this.media.getTracks()) track.stop();
    if (this.ctx) this.ctx.close().catch(() => {});
    if (call === this) call = null;
    setState(state, text);
    if (this.opened_) {
      const link = recordLink.querySelector("a");
      link.href = `/calls/${encodeURIComponent(this.callSid)}`;
      recordLink.hidden = false;
    }
  }
}

/** Before asking for the microphone: is the server there, and are we still signed in? */
async function serverReady() {
  let response;
  try {
    response = await fetch("/softphone", { credentials: "same-origin", redirect: "manual", cache: "no-store" });
  } catch {
    setState("error", SERVER_DOWN);
    return false;
  }
  if (response.type === "opaqueredirect" || response.status === 401) {
    lc.toLogin();
    return false;
  }
  if (!response.ok) {
    setState("error", `The server is not taking calls right now (HTTP ${response.status}).`);
    return false;
  }
  return true;
}

muteButton.addEventListener("click", () => {
  if (call) call.setMuted(!call.muted);
});
keypad.addEventListener("click", (event) => {
  const key = event.target.closest("button[data-digit]");
  if (key && call) call.dtmf(key.dataset.digit);
});

callButton.addEventListener("click", async () => {
  if (call) return;
  recordLink.hidden = true;
  timer.textContent = "0:00";
  muteButton.setAttribute("aria-pressed", "false");
  muteButton.textContent = "Mute";
  if (!(await serverReady())) return;
  call = new Call($("profile").value);
  lastSid = null;
  transcript.replaceChildren();
  $("softphone-waiting").hidden = false;
  setState("connecting", "Connecting…");
  try {
    await call.start($("voice-processing").checked);
  } catch (error) {
    const current = call;
    if (current) current.finish("");
    const message = error && error.message === SERVER_DOWN ? SERVER_DOWN : `Could not start the call: ${error.message || error}`;
    setState("error", message);
  }
});

hangupButton.addEventListener("click", () => {
  if (call) call.hangUp();
});

// The transcript comes from the live feed, exactly as the live page sees the call.
const events = new EventSource("/live/events");
const mine = (msg) => msg.call_sid === lastSid;
events.addEventListener("snapshot", (e) => {
  for (const c of JSON.parse(e.data).calls) {
    if (c.call_sid === lastSid) for (const turn of c.turns) lc.upsertTurn(transcript, turn);
  }
});
for (const kind of ["turn", "partial"]) {
  events.addEventListener(kind, (e) => {
    const msg = JSON.parse(e.data);
    if (!mine(msg)) return;
    lc.upsertTurn(transcript, msg.turn);
    $("softphone-waiting").hidden = true;
  });
}
events.addEventListener("call_ended", (e) => {
  const msg = JSON.parse(e.data);
  if (mine(msg) && msg.summary) wire(`call ended: ${msg.summary.end_reason.replaceAll("_", " ")}`);
});
window.addEventListener("pagehide", () => {
  events.close();
  if (call) call.hangUp();
});
setState("idle", "Ready.");
