// G.711 μ-law, the codec of Twilio Media Streams: 8-bit codes <-> 16-bit linear PCM.
// An ES module, imported by the softphone's audio worklet (and by the tests).

const BIAS = 0x84;
const CLIP = 8159; // in the 14-bit domain
const SEG_END = [0x3f, 0x7f, 0xff, 0x1ff, 0x3ff, 0x7ff, 0xfff, 0x1fff];

/** One 16-bit sample (integer, -32768..32767) to its μ-law code: the classic segment
 *  rules (Sun's g711.c), so the page encodes exactly as livecall.audio.g711 does. */
export function encodeSample(sample) {
  let x = sample >> 2; // 16-bit -> 14-bit, arithmetic shift
  let mask = 0xff;
  if (x < 0) {
    x = -x;
    mask = 0x7f;
  }
  x = Math.min(x, CLIP) + (BIAS >> 2);
  let seg = 0;
  while (seg < 8 && x > SEG_END[seg]) seg++;
  if (seg >= 8) return 0x7f ^ mask;
  return ((seg << 4) | ((x >> (seg + 1)) & 0x0f)) ^ mask;
}

function decodeSample(code) {
  const u = ~code & 0xff;
  const magnitude = (((u & 0x0f) << 3) + BIAS) << ((u >> 4) & 0x07);
  return u & 0x80 ? BIAS - magnitude : magnitude - BIAS;
}

/** μ-law code -> 16-bit sample. */
export const ULAW_TO_INT16 = Int16Array.from({ length: 256 }, (_, code) => decodeSample(code));

/** μ-law code -> float sample in [-1, 1), what Web Audio plays. */
export const ULAW_TO_FLOAT = Float32Array.from(ULAW_TO_INT16, (s) => s / 32768);

/** Float samples in [-1, 1] to μ-law codes (written into `out`, which is returned). */
export function encodeFloats(samples, out = new Uint8Array(samples.length)) {
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    out[i] = encodeSample(Math.round(s * 32767));
  }
  return out;
}
