// The softphone's audio thread: microphone -> 8 kHz μ-law frames of 20 ms (160 bytes) for
// the main thread to send; received μ-law -> the speakers, with Twilio's playout rules:
// audio queues in order, a mark is echoed once everything before it has played, and
// `clear` drops the queue and echoes every pending mark at once.
import { encodeFloats, ULAW_TO_FLOAT } from "./g711.js";
import { Resampler } from "./resampler.js";

const PHONE_RATE = 8000;
const FRAME = 160; // 20 ms at 8 kHz
const FEED = 8; // 8 kHz samples handed to the playback resampler at a time

class SoftphoneProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.capturing = false;
    this.down = new Resampler(sampleRate, PHONE_RATE);
    this.up = new Resampler(PHONE_RATE, sampleRate);
    this.pcm = new Float32Array(FRAME);
    this.fill = 0;
    this.silence = new Float32Array(128);
    this.queue = []; // Float32Array chunks at 8 kHz, oldest first
    this.head = 0; // read position in queue[0]
    this.queued = 0; // 8 kHz samples enqueued, ever
    this.played = 0; // 8 kHz samples handed to playback, ever
    this.marks = []; // { at: queued position, name }
    this.out = new Float32Array(4096);
    this.outLen = 0;
    this.levels = { mic: 0, agent: 0, n: 0 };
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  onMessage(msg) {
    if (msg.type === "start") this.capturing = true;
    else if (msg.type === "stop") this.capturing = false;
    else if (msg.type === "play") {
      const bytes = msg.bytes;
      const chunk = new Float32Array(bytes.length);
      for (let i = 0; i < bytes.length; i++) chunk[i] = ULAW_TO_FLOAT[bytes[i]];
      this.queue.push(chunk);
      this.queued += chunk.length;
    } else if (msg.type === "mark") {
      this.marks.push({ at: this.queued, name: msg.name });
    } else if (msg.type === "clear") {
      this.queue = [];
      this.head = 0;
      this.played = this.queued;
      this.up.reset();
      this.outLen = 0;
      this.echoMarks();
    }
  }

  echoMarks() {
    while (this.marks.length && this.marks[0].at <= this.played) {
      this.port.postMessage({ type: "played", name: this.marks.shift().name });
    }
  }

  /** Next `n` samples of queued agent audio at 8 kHz, silence when there is none. */
  take(n) {
    const chunk = new Float32Array(n);
    let filled = 0;
    while (filled < n && this.queue.length) {
      const first = this.queue[0];
      const k = Math.min(n - filled, first.length - this.head);
      chunk.set(first.subarray(this.head, this.head + k), filled);
      filled += k;
      this.head += k;
      if (this.head === first.length) {
        this.queue.shift();
        this.head = 0;
      }
    }
    this.played += filled;
    return chunk;
  }

  capture(input) {
    const samples = this.down.push(input || this.silence);
    let sum = 0;
    for (const s of input || this.silence) sum += s * s;
    this.levels.mic = Math.max(this.levels.mic, Math.sqrt(sum / 128));
    for (let i = 0; i < samples.length; i++) {
      this.pcm[this.fill++] = samples[i];
      if (this.fill === FRAME) {
        const bytes = encodeFloats(this.pcm);
        this.port.postMessage({ type: "frame", bytes }, [bytes.buffer]);
        this.fill = 0;
      }
    }
  }

  playback(output) {
    while (this.outLen < output.length) {
      const more = this.up.push(this.take(FEED));
      if (this.outLen + more.length > this.out.length) break;
      this.out.set(more, this.outLen);
      this.outLen += more.length;
    }
    const n = Math.min(output.length, this.outLen);
    output.set(this.out.subarray(0, n));
    this.out.copyWithin(0, n, this.outLen);
    this.outLen -= n;
    let sum = 0;
    for (let i = 0; i < n; i++) sum += output[i] * output[i];
    this.levels.agent = Math.max(this.levels.agent, Math.sqrt(sum / output.length));
    this.echoMarks();
  }

  process(inputs, outputs) {
    const mic = inputs[0] && inputs[0][0];
    if (this.capturing) this.capture(mic);
    const speaker = outputs[0] && outputs[0][0];
    if (speaker) {
      this.playback(speaker);
      for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(speaker);
    }
    if (++this.levels.n >= Math.round(sampleRate / 128 / 10)) {
      const queuedMs = ((this.queued - this.played) / PHONE_RATE) * 1000;
      this.port.postMessage({ type: "level", mic: this.levels.mic, agent: this.levels.agent, queuedMs });
      this.levels = { mic: 0, agent: 0, n: 0 };
    }
    return true;
  }
}

registerProcessor("softphone", SoftphoneProcessor);
