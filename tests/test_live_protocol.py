"""Gemini Live frames: what we send is what the SDK sends; what we parse matches the SDK."""

from __future__ import annotations

import base64

import orjson
import pytest
from google.genai import types

from livecall.agent import live_protocol as lp


def test_audio_message_is_realtime_input_with_standard_base64() -> None:
    pcm = bytes(range(256)) * 3
    msg = orjson.loads(lp.audio_message(pcm))
    audio = msg["realtimeInput"]["audio"]
    assert audio["mimeType"] == "audio/pcm;rate=16000"
    assert base64.b64decode(audio["data"], validate=True) == pcm
    assert set(msg) == {"realtimeInput"}


def test_other_rates_and_control_messages() -> None:
    assert "rate=24000" in lp.audio_message(b"\0\0", rate=24000)
    assert orjson.loads(lp.text_message('caller pressed "5"')) == {
        "realtimeInput": {"text": 'caller pressed "5"'}
    }
    turn = orjson.loads(lp.client_text_turn_message("hello"))
    assert turn["clientContent"]["turnComplete"] is True
    assert turn["clientContent"]["turns"][0] == {"role": "user", "parts": [{"text": "hello"}]}
    resp = orjson.loads(lp.tool_response_message([{"id": "fc-1", "name": "x", "response": {}}]))
    assert resp["toolResponse"]["functionResponses"][0]["id"] == "fc-1"
    assert orjson.loads(lp.audio_stream_end_message()) == {
        "realtimeInput": {"audioStreamEnd": True}
    }


def _sdk(frame: dict) -> types.LiveServerMessage:
    return types.LiveServerMessage._from_response(response=frame, kwargs={})


def test_audio_and_transcript_in_one_message_match_the_sdk() -> None:
    pcm = b"\x01\x02" * 480
    frame = {
        "serverContent": {
            "modelTurn": {
                "parts": [
                    {
                        "inlineData": {
                            "mimeType": "audio/pcm;rate=24000",
                            "data": base64.b64encode(pcm).decode(),
                        }
                    }
                ]
            },
            "outputTranscription": {"text": "Hello"},
        }
    }
    events = lp.parse_server_message(orjson.dumps(frame))
    assert [type(e) for e in events] == [lp.AgentAudio, lp.AgentTranscript]
    assert events[0].pcm == pcm and events[0].rate == 24000
    sdk = _sdk(frame)
    assert sdk.server_content.model_turn.parts[0].inline_data.data == events[0].pcm
    assert sdk.server_content.output_transcription.text == events[1].text


def test_snake_case_and_url_safe_unpadded_base64() -> None:
    pcm = bytes([0xFB, 0xFF, 0xFE, 0x00]) * 5 + b"\xfb\xef"
    data = base64.urlsafe_b64encode(pcm).decode().rstrip("=")
    frame = {
        "server_content": {
            "model_turn": {
                "parts": [{"inline_data": {"mime_type": "audio/pcm;rate=16000", "data": data}}]
            }
        }
    }
    (event,) = lp.parse_server_message(orjson.dumps(frame))
    assert isinstance(event, lp.AgentAudio)
    assert event.pcm == pcm and event.rate == 16000


def test_barge_in_sequence_and_usage() -> None:
    assert [
        type(e) for e in lp.parse_server_message(b'{"serverContent":{"interrupted":true}}')
    ] == [lp.Interrupted]
    events = lp.parse_server_message(
        orjson.dumps(
            {
                "serverContent": {"turnComplete": True},
                "usageMetadata": {
                    "promptTokenCount": 10,
                    "responseTokenCount": 5,
                    "totalTokenCount": 15,
                },
            }
        )
    )
    assert events == [lp.TurnComplete(lp.Usage(10, 5, 15))]
    only = lp.parse_server_message(b'{"usageMetadata":{"totalTokenCount":3}}')
    assert only == [lp.UsageOnly(lp.Usage(0, 0, 3))]


def test_control_messages() -> None:
    events = lp.parse_server_message(
        orjson.dumps(
            {"toolCall": {"functionCalls": [{"id": "fc-1", "name": "end_call", "args": {"a": 1}}]}}
        )
    )
    assert events == [lp.ToolCall([lp.FunctionCall("fc-1", "end_call", {"a": 1})])]
    assert lp.parse_server_message(b'{"toolCallCancellation":{"ids":["fc-1"]}}') == [
        lp.ToolCallCancellation(["fc-1"])
    ]
    assert lp.parse_server_message(b'{"goAway":{"timeLeft":"50s"}}') == [lp.GoAway(50.0)]
    assert lp.parse_server_message(b'{"goAway":{"timeLeft":"1.5s"}}') == [lp.GoAway(1.5)]
    assert lp.parse_server_message(
        b'{"sessionResumptionUpdate":{"newHandle":"h-1","resumable":true}}'
    ) == [lp.ResumptionUpdate("h-1", True)]
    assert lp.parse_server_message(b'{"sessionResumptionUpdate":{}}') == [
        lp.ResumptionUpdate(None, False)
    ]
    assert lp.parse_server_message(b'{"setupComplete":{"sessionId":"s1"}}') == [
        lp.SetupComplete("s1")
    ]
    transcripts = lp.parse_server_message(
        b'{"serverContent":{"inputTranscription":{"text":"I would like"}}}'
    )
    assert transcripts == [lp.CallerTranscript("I would like")]


@pytest.mark.parametrize(
    "frame",
    [
        b"not json",
        b"[1,2]",
        b'{"serverContent":{"modelTurn":{"parts":[{"inlineData":'
        b'{"mimeType":"audio/pcm;rate=24000","data":"@@@"}}]}}}',
    ],
)
def test_bad_frames_raise_a_protocol_error(frame: bytes) -> None:
    with pytest.raises(lp.LiveProtocolError):
        lp.parse_server_message(frame)


def test_unknown_fields_and_non_audio_parts_are_ignored() -> None:
    frame = {
        "serverContent": {
            "modelTurn": {
                "parts": [
                    {"text": "thinking"},
                    {"inlineData": {"mimeType": "image/png", "data": "AAAA"}},
                ]
            },
            "groundingMetadata": {},
        },
        "voiceActivity": {},
    }
    assert lp.parse_server_message(orjson.dumps(frame)) == []


def test_turn_complete_reason_status_and_waiting_match_the_sdk() -> None:
    frame = {
        "serverContent": {
            "turnComplete": True,
            "turnCompleteReason": "MALFORMED_FUNCTION_CALL",
            "interactionStatus": "IDLE",
        }
    }
    (done,) = lp.parse_server_message(orjson.dumps(frame))
    assert isinstance(done, lp.TurnComplete)
    assert (done.reason, done.status, done.failed, done.in_progress) == (
        "MALFORMED_FUNCTION_CALL",
        lp.InteractionStatus.IDLE,
        True,
        False,
    )
    sdk = _sdk(frame).server_content
    assert sdk.turn_complete_reason == types.TurnCompleteReason.MALFORMED_FUNCTION_CALL
    assert sdk.interaction_status == types.InteractionStatus.IDLE

    waiting = {
        "serverContent": {
            "waitingForInput": True,
            "turnComplete": True,
            "turnCompleteReason": "NEED_MORE_INPUT",
            "interactionStatus": "IN_PROGRESS",
        }
    }
    events = lp.parse_server_message(orjson.dumps(waiting))
    assert [type(e) for e in events] == [lp.WaitingForInput, lp.TurnComplete]
    assert not events[1].failed and events[1].in_progress  # type: ignore[union-attr]
    assert _sdk(waiting).server_content.waiting_for_input is True


@pytest.mark.parametrize(
    ("reason", "status", "failed", "in_progress"),
    [
        (None, None, False, False),  # today's turnComplete: nothing more said
        ("RESPONSE_REJECTED", "in_progress", True, True),  # names in any case
        ("PROHIBITED_INPUT_CONTENT", "REQUIRES_ACTION", True, False),  # deprecated: IDLE
        ("SOME_FUTURE_REASON", "SOME_FUTURE_STATUS", True, False),  # tolerated, not errors
        ("TURN_COMPLETE_REASON_UNSPECIFIED", "INTERACTION_STATUS_UNSPECIFIED", False, False),
        (1, 1, True, True),  # proto enum numbers: MALFORMED_FUNCTION_CALL, IN_PROGRESS
        (3, 3, False, False),  # NEED_MORE_INPUT, IDLE
        (99, 99, True, False),
        ("", {"odd": 1}, False, False),  # junk reads as absent
    ],
)
def test_turn_complete_fields_are_tolerant(
    reason: object, status: object, failed: bool, in_progress: bool
) -> None:
    content: dict[str, object] = {"turn_complete": True}
    if reason is not None:
        content["turn_complete_reason"] = reason
    if status is not None:
        content["interaction_status"] = status
    (done,) = lp.parse_server_message(orjson.dumps({"server_content": content}))
    assert isinstance(done, lp.TurnComplete)
    assert (done.failed, done.in_progress) == (failed, in_progress)


def test_interim_input_transcription_is_its_own_event() -> None:
    frame = {
        "serverContent": {
            "interimInputTranscription": {"text": "what time do"},
        }
    }
    assert lp.parse_server_message(orjson.dumps(frame)) == [lp.CallerInterim("what time do")]
    assert _sdk(frame).server_content.interim_input_transcription.text == "what time do"
    both = {
        "serverContent": {
            "interimInputTranscription": {"text": "on Sundays"},
            "inputTranscription": {"text": "What time do you open"},
        }
    }
    assert [type(e) for e in lp.parse_server_message(orjson.dumps(both))] == [
        lp.CallerInterim,
        lp.CallerTranscript,
    ]
    empty = {"serverContent": {"interimInputTranscription": {}}}
    assert lp.parse_server_message(orjson.dumps(empty)) == []
