"""The Gemini link's audio send path against the fake Live server, through the real SDK."""

from __future__ import annotations

import os

import pytest

from livecall.agent.gemini import GeminiClosed, GeminiLink, LiveOptions, _client
from livecall.sim.gemini import CloseFault, FakeGeminiServer, Scenario


async def _open(fake: FakeGeminiServer) -> GeminiLink:
    client = _client("key", False, None, None, fake.base_url, None, fake.ca_file)
    link = GeminiLink(client, LiveOptions(model="gemini-3.8-live", system_prompt="hi"))
    await link.connect()
    return link


async def test_audio_frames_reach_the_model_whole_and_in_order() -> None:
    frames = [os.urandom(640) for _ in range(200)]  # 4 s of 20 ms frames, 16 kHz
    async with FakeGeminiServer() as fake:
        link = await _open(fake)
        try:
            for pcm in frames:
                await link.send_audio(pcm)
            session = fake.sessions[0]
            await fake.wait_for(lambda: session.audio_chunks_received == len(frames))
            assert bytes(session.received_audio) == b"".join(frames)
        finally:
            await link.close()


@pytest.mark.parametrize("drop", [False, True], ids=["closed", "dropped"])
async def test_audio_after_the_session_ended_raises_gemini_closed(drop: bool) -> None:
    # the server ends the session instead of taking the second audio frame
    fault = CloseFault(code=1011, on_message="realtimeInput", nth=2, drop=drop)
    async with FakeGeminiServer(scenario=Scenario(closes=[fault])) as fake:
        link = await _open(fake)
        try:
            await link.send_audio(bytes(640))
            await link.send_audio(bytes(640))
            with pytest.raises(GeminiClosed) as lost:
                while True:  # the server's events until the close arrives
                    await link.receive()
            assert lost.value.code == (1006 if drop else 1011)
            with pytest.raises(GeminiClosed):  # never another exception
                await link.send_audio(bytes(640))
        finally:
            await link.close()
