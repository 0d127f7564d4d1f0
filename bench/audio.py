"""Audio benchmark: resampler candidates and the per-frame codec path (see docs/audio.md)."""

from livecall.bench.audio import run_audio_benchmark

run_audio_benchmark()
