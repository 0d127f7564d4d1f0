// A streaming band-limited resampler (windowed sinc, table of phases) for the softphone:
// microphone rate -> 8 kHz before μ-law, 8 kHz -> the audio device's rate for playback.
// Low-pass below the lower rate's Nyquist, so nothing aliases into the phone band.

export class Resampler {
  constructor(inRate, outRate, { zeroCrossings = 8, phases = 256, passband = 0.9 } = {}) {
    this.inRate = inRate;
    this.outRate = outRate;
    this.step = inRate / outRate; // input samples per output sample
    const fc = (passband * 0.5 * Math.min(inRate, outRate)) / inRate; // cycles per input sample
    this.half = Math.ceil(zeroCrossings / (2 * fc));
    this.width = 2 * this.half;
    this.phases = phases;
    this.table = new Float32Array((phases + 1) * this.width);
    for (let p = 0; p <= phases; p++) {
      const frac = p / phases;
      let sum = 0;
      for (let j = 0; j < this.width; j++) {
        const x = frac - (j - this.half + 1); // distance from the output point to the tap
        const w = kernel(x, fc, this.half);
        this.table[p * this.width + j] = w;
        sum += w;
      }
      for (let j = 0; j < this.width; j++) this.table[p * this.width + j] /= sum; // unity gain
    }
    this.buf = new Float32Array(4096);
    this.reset();
  }

  /** Forget the signal so far (after a `clear`: the next audio is unrelated). */
  reset() {
    this.buf.fill(0);
    this.len = this.half - 1; // silent history, so the first output lines up with input 0
    this.pos = this.half - 1;
  }

  /** Feed input samples; returns the output samples they complete. */
  push(input) {
    if (this.len + input.length > this.buf.length) {
      const bigger = new Float32Array(2 * (this.len + input.length));
      bigger.set(this.buf.subarray(0, this.len));
      this.buf = bigger;
    }
    this.buf.set(input, this.len);
    this.len += input.length;
    const count = Math.max(0, Math.ceil((this.len - this.half - this.pos) / this.step) + 1);
    const out = new Float32Array(count);
    let n = 0;
    const { buf, table, width, phases } = this;
    while (n < count) {
      const base = Math.floor(this.pos);
      if (base + this.half > this.len - 1) break;
      const row = Math.round((this.pos - base) * phases) * width;
      const first = base - this.half + 1;
      let acc = 0;
      for (let j = 0; j < width; j++) acc += buf[first + j] * table[row + j];
      out[n++] = acc;
      this.pos += this.step;
    }
    const drop = Math.floor(this.pos) - this.half + 1;
    if (drop > 0) {
      buf.copyWithin(0, drop, this.len);
      this.len -= drop;
      this.pos -= drop;
    }
    return n === count ? out : out.subarray(0, n);
  }
}

function kernel(x, fc, half) {
  if (Math.abs(x) >= half) return 0;
  const t = x / half;
  const window = 0.42 + 0.5 * Math.cos(Math.PI * t) + 0.08 * Math.cos(2 * Math.PI * t); // Blackman
  const arg = 2 * fc * x;
  const sinc = arg === 0 ? 1 : Math.sin(Math.PI * arg) / (Math.PI * arg);
  return sinc * window;
}
