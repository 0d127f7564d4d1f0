"""Streaming sample-rate conversion for the per-frame audio path (8k ↔ 16k ↔ 24k).

Why not soxr's `ResampleStream`: its long filters hold back 22–85 ms of audio on average (up to
150 ms) per direction, and on a phone call that is added to every turn. Why not one-shot
resampling per 20 ms frame: every frame edge becomes a click (in-band SNR ~28 dB). What we do
instead is a linear-phase polyphase FIR (Parks-McClellan, 97 taps at 16 kHz / 145 at 24 kHz,
passband to 0.85 of the lower Nyquist, stopband from the lower Nyquist) streamed with carried
history: 3 ms held back, ~70 dB alias/image rejection, ~61 dB in-band SNR against a
high-quality whole-signal reference (numbers and method: docs/audio.md).

Two implementation choices make it both exact and cheap:

* Taps are fixed point (Q20) and samples are integers, so every product and every partial sum is
  an exact multiple of 2**-20 below 2**20 in magnitude: it fits float64's 53-bit mantissa, so the
  float64 arithmetic is *exact* in any summation order. Output is therefore bit-identical however
  the stream is chunked, and identical to the one-shot integer convolution (the tests check both).
* The convolution runs as one small BLAS matrix product per call. Each row of the left matrix is
  a contiguous run of input (a block of output groups plus the filter span); the right matrix
  holds the polyphase taps shifted per group (block Toeplitz), plus a constant row that adds a
  rounding bias. Rounding (half up) and int16 saturation are then a truncating cast and a
  `take(..., mode="clip")` from a 65,536-entry table, which can also be the μ-law encoder.
"""

from __future__ import annotations

from functools import lru_cache
from math import gcd

import numpy as np
import numpy.typing as npt
from scipy import signal

__all__ = [
    "PolyphaseResampler",
    "StreamResampler",
    "design_lowpass",
    "quantize_taps",
]

Int16Array = npt.NDArray[np.int16]
Float64Array = npt.NDArray[np.float64]

FRAC_BITS = 20
"""Fixed-point fraction bits of the taps: quantisation noise ~-120 dB, far below int16."""
_ONE = 1 << FRAC_BITS

PASS_FRACTION = 0.85
"""Passband edge as a fraction of the lower Nyquist: 3.4 kHz for the 8 kHz phone side."""

_TAPS_PER_TRANSITION = 3.6
"""Taps x (transition width / filter rate): gives ~70 dB stopband and ~1e-3 ripple with remez."""

_MAX_RATIO = 12
"""Largest reduced up/down factor accepted; beyond it the prototype filter gets too long."""

BIAS = 32768.5
"""Added by the filter so floor(acc) is round-half-up(y) + 32768, a valid index into 0..65535."""

SATURATE_INT16: npt.NDArray[np.int16] = np.arange(-32768, 32768, dtype="<i2")
"""Biased index -> int16; with `take(mode="clip")` out-of-range values saturate, never wrap."""
SATURATE_INT16.setflags(write=False)

_GROUPS_PER_STEP = 512
"""Output groups one internal step can produce; bigger inputs are cut into steps."""

_INT16 = np.dtype(np.int16)
_FLOAT64 = np.dtype(np.float64)
_dot = np.dot


def _ratio(in_rate: int, out_rate: int) -> tuple[int, int]:
    if in_rate <= 0 or out_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
    g = gcd(in_rate, out_rate)
    up, down = out_rate // g, in_rate // g
    if max(up, down) > _MAX_RATIO:
        raise ValueError(
            f"{in_rate} -> {out_rate} Hz reduces to {up}/{down}; factors above {_MAX_RATIO} "
            "are not supported (8k/16k/24k/48k combinations are)"
        )
    return up, down


def design_lowpass(
    in_rate: int, out_rate: int, *, method: str = "remez", num_taps: int | None = None
) -> Float64Array:
    """Prototype low-pass at the intermediate rate `up * in_rate`, with DC gain `up`.

    Passband to 0.85 of the lower Nyquist, stopband from the lower Nyquist, so nothing above the
    narrow side's band folds back into it (downsampling) or survives as an image (upsampling).
    `method` is "remez" (equiripple: the shortest filter for the spec, hence the least delay) or
    "kaiser" (windowed sinc, kept for comparison in the benchmark).
    """
    up, down = _ratio(in_rate, out_rate)
    if up == down == 1:
        return np.ones(1)
    fs = up * in_rate
    nyq = min(in_rate, out_rate) / 2
    f_pass, f_stop = PASS_FRACTION * nyq, nyq
    width = (f_stop - f_pass) / fs
    if method == "remez":
        if num_taps is None:
            num_taps = 2 * round(_TAPS_PER_TRANSITION / width / 2) + 1
        h = signal.remez(num_taps, [0, f_pass, f_stop, fs / 2], [up, 0], weight=[1, 4], fs=fs)
    elif method == "kaiser":
        est, beta = signal.kaiserord(72.0, 2 * width)
        if num_taps is None:
            num_taps = est | 1
        h = up * signal.firwin(num_taps, (f_pass + f_stop) / 2, window=("kaiser", beta), fs=fs)
    else:
        raise ValueError(f"unknown filter design method {method!r} (use 'remez' or 'kaiser')")
    if num_taps % 2 == 0:
        raise ValueError(f"num_taps must be odd (integer group delay), got {num_taps}")
    return np.asarray(h, dtype=np.float64)


def quantize_taps(taps: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Round taps to Q20 integers: the form the exact float64 arithmetic needs.

    No further adjustment (e.g. forcing each polyphase branch to unity DC gain): bumping one tap
    by the passband ripple would put a flat error of that size across the stopband.
    """
    return np.rint(np.asarray(taps, dtype=np.float64) * _ONE).astype(np.int64)


class _Plan:
    """Everything about a (rates, taps) pair that does not change per call; shared, read-only."""

    def __init__(self, in_rate: int, out_rate: int, taps: npt.NDArray[np.int64]) -> None:
        up, down = _ratio(in_rate, out_rate)
        k = len(taps)
        if k % 2 == 0:
            raise ValueError(f"need an odd number of taps (integer group delay), got {k}")
        self.up, self.down, self.delay = up, down, (k - 1) // 2
        # Output j is the filtered, upsampled signal at index j*down + delay (delay compensated):
        #   y[j] = sum_n h[j*down + delay - n*up] * x[n].
        # Group q = outputs q*up .. q*up+up-1, which read inputs q*down + m for m in [m_lo, m_hi].
        self.m_lo = -(self.delay // up)
        m_hi = ((up - 1) * down + self.delay) // up
        width = m_hi - self.m_lo + 1
        # Block of S groups per matrix row: small S wastes fewer multiplies on the Toeplitz
        # zeros, large S means fewer rows; 8-16 output samples per row measured fastest.
        self.block = max(1, 16 // up) if down == 1 else 8
        s = self.block
        self.span = (s - 1) * down + width
        h = np.asarray(taps, dtype=np.float64) * (2.0**-FRAC_BITS)
        t = np.zeros((self.span + 1, s * up))
        for g in range(s):
            for phase in range(up):
                for m in range(self.m_lo, m_hi + 1):
                    idx = phase * down + self.delay - m * up
                    if 0 <= idx < k:
                        t[g * down + m - self.m_lo, g * up + phase] = h[idx]
        t[self.span, :] = BIAS  # multiplied by the constant 1.0 column of the input matrix
        t.setflags(write=False)
        self.matrix = t
        self.max_rows = -(-_GROUPS_PER_STEP // s)
        self.step_in = (_GROUPS_PER_STEP - 3) * down  # inputs per step, so groups <= limit
        self.history = width + 2 * down + 1  # inputs kept before the next group's first input
        self.read_extent = (self.max_rows - 1) * s * down + self.span
        # A call reads from at most `down` inputs past the data, so `room` (the write limit)
        # keeps a margin below capacity - read_extent.
        self.room = self.history + self.step_in + 16
        self.capacity = self.room + 4 * down + 16 + self.read_extent


@lru_cache(maxsize=64)
def _plan(in_rate: int, out_rate: int, taps_key: bytes) -> _Plan:
    return _Plan(in_rate, out_rate, np.frombuffer(taps_key, dtype=np.int64))


@lru_cache(maxsize=64)
def _default_taps(in_rate: int, out_rate: int) -> bytes:
    return quantize_taps(design_lowpass(in_rate, out_rate)).tobytes()


class PolyphaseResampler:
    """Stateful rational resampler (int16 in, int16 out) for any chunk sizes, with given taps.

    `taps` are Q20 integers at rate `up * in_rate` (see `quantize_taps`), odd length, with DC gain
    `up`. Use `StreamResampler` for the project default.
    """

    in_rate: int
    out_rate: int
    delay_ms: float
    taps: npt.NDArray[np.int64]  # Q20 prototype filter at up * in_rate (read-only)

    def __init__(self, in_rate: int, out_rate: int, taps: npt.ArrayLike) -> None:
        q = np.ascontiguousarray(taps, dtype=np.int64)
        if q.ndim != 1 or q.size == 0:
            raise ValueError("taps must be a non-empty 1-D array")
        if int(np.abs(q).sum()) >= 1 << 32:  # keeps every partial sum exact in float64
            raise ValueError("taps too large: expected Q20 fixed point (1.0 == 2**20)")
        plan = _plan(int(in_rate), int(out_rate), q.tobytes())
        self._p = plan
        self.taps = q.copy()
        self.taps.setflags(write=False)
        self.in_rate, self.out_rate = int(in_rate), int(out_rate)
        # Longest wait of an output sample behind the input that defines it: the group delay.
        self.delay_ms = 1000.0 * plan.delay / (plan.up * self.in_rate)
        self._up, self._down, self._delay = plan.up, plan.down, plan.delay
        self._m_lo, self._block, self._span = plan.m_lo, plan.block, plan.span
        self._step_in = plan.step_in
        self._room = plan.room
        self._matrix = plan.matrix
        self._row_step = plan.block * plan.down
        self._buf = np.zeros(plan.capacity)
        # Every window of `span` consecutive inputs, as rows: a call slices every row_step-th.
        self._windows = np.ndarray(
            (plan.capacity - plan.span + 1, plan.span), _FLOAT64, self._buf, 0, (8, 8)
        )
        rows = np.empty((plan.max_rows, plan.span + 1))
        rows[:, plan.span] = 1.0  # the bias column
        out = np.empty((plan.max_rows, plan.block * plan.up))
        # Views per row count, built once so that a call only indexes a list.
        self._rows_in = [rows[:r, : plan.span] for r in range(plan.max_rows + 1)]
        self._rows = [rows[:r] for r in range(plan.max_rows + 1)]
        self._out = [out[:r] for r in range(plan.max_rows + 1)]
        self._out_flat = [out[:r].reshape(-1) for r in range(plan.max_rows + 1)]
        self._idx = np.empty(plan.max_rows * plan.block * plan.up, dtype=np.intp)
        self.reset()

    # -- public API ------------------------------------------------------------------------

    def process(self, samples: Int16Array) -> Int16Array:
        """Feed int16 samples (any length); return every output sample now fully determined."""
        if type(samples) is not np.ndarray or samples.dtype is not _INT16 or samples.ndim != 1:
            _check_int16(samples)
        n = len(samples)
        if n <= self._step_in:
            self._reserve(n)[...] = samples
            return SATURATE_INT16.take(self._advance(n), mode="clip")
        parts = [
            self.process(samples[lo : lo + self._step_in]) for lo in range(0, n, self._step_in)
        ]
        return np.concatenate(parts)

    def process_bytes(self, pcm: bytes | bytearray | memoryview) -> bytes:
        """`process` for PCM16LE bytes; the bytes must hold whole samples."""
        nbytes = pcm.nbytes if isinstance(pcm, memoryview) else len(pcm)
        if nbytes % 2:
            raise ValueError(
                f"PCM16 input must have an even number of bytes (whole 16-bit samples), "
                f"got {nbytes}"
            )
        return self.process(np.frombuffer(pcm, dtype="<i2")).tobytes()

    def flush(self) -> Int16Array:
        """End of a turn: emit the tail the filter still holds, then start over.

        The stream is completed with silence and exactly round(n_in * out/in) samples (ties up)
        come out in total, so a turn's last syllable is not clipped and its length is kept.
        """
        up, down, delay = self._up, self._down, self._delay
        total = (2 * self._n_in * up + down) // (2 * down)
        parts = []
        while self._n_out < total:
            # inputs still missing before output total-1 is determined; they are silence
            need = -(-((total - 1) * down + delay + 1) // up) - self._n_in
            n = max(1, min(need, self._step_in))
            self._reserve(n)[...] = 0.0
            idx = self._advance(n)
            keep = len(idx) - max(0, self._n_out - total)
            parts.append(SATURATE_INT16.take(idx[:keep], mode="clip"))
        self.reset()
        if not parts:
            return np.zeros(0, dtype=np.int16)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def reset(self) -> None:
        """Barge-in: forget everything held, emit nothing; the next call starts fresh."""
        self._buf.fill(0.0)
        self._n_in = 0  # inputs received since the stream started
        self._n_out = 0  # outputs emitted
        self._off = self._m_lo  # absolute input index held in self._buf[0]

    # -- internals, also used by livecall.audio.transcode -------------------------------------
    # One call: slot = _reserve(n); fill slot with the n new input samples (float64, as is);
    # idx = _advance(n); out = TABLE.take(idx, mode="clip") with a 65,536-entry table indexed by
    # sample + 32768: SATURATE_INT16 for PCM, a rotated G.711 encode table for the wire.

    def _reserve(self, n: int) -> Float64Array:
        """Buffer slot for the next `n` (<= step_in) input samples."""
        pos = self._n_in - self._off
        if pos + n > self._room:
            # slide the history still needed to the front of the buffer
            first = (self._n_out // self._up) * self._down + self._m_lo
            keep = self._n_in - first
            self._buf[:keep] = self._buf[first - self._off : pos]
            self._off = first
            pos = keep
        return self._buf[pos : pos + n]

    def _advance(self, n: int) -> npt.NDArray[np.intp]:
        """Take in `n` filled inputs; return the newly determined outputs as table indices.

        The filter output already includes BIAS, so the truncating cast to intp is
        round-half-up(sample) + 32768; out-of-range values are left for the lookup's
        mode="clip" to saturate. The returned view is only valid until the next call.
        """
        up, down = self._up, self._down
        n_in = self._n_in = self._n_in + n
        j0 = self._n_out
        j1 = (n_in * up - self._delay + down - 1) // down  # ceil((n_in*up - delay) / down)
        if j1 <= j0:
            return self._idx[:0]
        self._n_out = j1
        q0 = j0 // up
        rows = (-(-j1 // up) - q0 + self._block - 1) // self._block
        start = q0 * down + self._m_lo - self._off
        step = self._row_step
        self._rows_in[rows][...] = self._windows[start : start + rows * step : step]
        _dot(self._rows[rows], self._matrix, self._out[rows])
        a = j0 - q0 * up
        idx = self._idx[: j1 - j0]
        idx[...] = self._out_flat[rows][a : a + j1 - j0]
        return idx


def _check_int16(samples: object) -> None:
    if not isinstance(samples, np.ndarray):
        raise TypeError(f"samples must be an int16 numpy array, got {type(samples).__name__}")
    if samples.dtype != np.int16:
        raise TypeError(f"samples must be int16, got {samples.dtype}")
    if samples.ndim != 1:
        raise ValueError(f"samples must be 1-D (mono), got shape {samples.shape}")


class StreamResampler(PolyphaseResampler):
    """The project's streaming resampler: remez polyphase FIR, ~3 ms held back per direction.

    `process` returns what is ready now; `flush` ends a turn; `reset` drops everything
    (barge-in). Output for any chunking equals the one-shot result sample for sample.
    """

    def __init__(self, in_rate: int, out_rate: int) -> None:
        taps = np.frombuffer(_default_taps(int(in_rate), int(out_rate)), dtype=np.int64)
        super().__init__(in_rate, out_rate, taps)
