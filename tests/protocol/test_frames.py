"""Tests for pipeproof.protocol.frames: every frame parses, serialises and matches its JSON Schema."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pipeproof.protocol.frames import (
    CLIENT_FRAME_MODELS,
    SERVER_FRAME_MODELS,
    Ack,
    ConnectionInit,
    ErrorFrame,
    InvalidMessage,
    RunStart,
    parse_client_frame,
    parse_server_frame,
)

ALL = CLIENT_FRAME_MODELS + SERVER_FRAME_MODELS


@pytest.mark.parametrize("model", ALL, ids=lambda m: m.__name__)
def test_example_validates_against_schema_and_round_trips(model) -> None:
    example = model.json_example()
    jsonschema.validate(example, model.model_json_schema(by_alias=True))
    parsed = model.model_validate(example)
    assert json.loads(parsed.to_wire()) == example


@pytest.mark.parametrize("model", CLIENT_FRAME_MODELS, ids=lambda m: m.__name__)
def test_client_examples_parse_through_the_union(model) -> None:
    frame = parse_client_frame(json.dumps(model.json_example()))
    assert type(frame) is model


@pytest.mark.parametrize("model", SERVER_FRAME_MODELS, ids=lambda m: m.__name__)
def test_server_examples_parse_through_the_union(model) -> None:
    assert type(parse_server_frame(json.dumps(model.json_example()))) is model


def test_unknown_fields_are_ignored() -> None:
    frame = parse_client_frame('{"type":"ack","seq":3,"extra":{"x":1}}')
    assert frame == Ack(seq=3)


def test_dotted_types() -> None:
    frame = parse_client_frame('{"type":"run.start","request_id":"r","input":"hi"}')
    assert isinstance(frame, RunStart) and frame.tools is None
    assert json.loads(frame.to_wire()) == {"type": "run.start", "request_id": "r", "input": "hi"}


def test_init_without_token_is_not_a_schema_violation() -> None:
    frame = parse_client_frame('{"type":"connection_init"}')
    assert isinstance(frame, ConnectionInit) and frame.token is None


@pytest.mark.parametrize(
    ("text", "frame_type", "fragment"),
    [
        ("{not json", None, "not JSON"),
        ("[1,2]", None, "JSON object"),
        ('{"seq":1}', None, "'type'"),
        ('{"type":7}', None, "'type'"),
        ('{"type":"run.stop"}', "run.stop", "unknown frame type"),
        ('{"type":"ack","seq":-1}', "ack", "seq"),
        ('{"type":"ack"}', "ack", "seq"),
        ('{"type":"run.start","input":"x"}', "run.start", "request_id"),
        ('{"type":"connection_init","token":12345}', "connection_init", "token"),
        (b"\xff\xfe", None, "UTF-8"),
    ],
)
def test_invalid_frames_raise_invalid_message(text, frame_type, fragment) -> None:
    with pytest.raises(InvalidMessage) as info:
        parse_client_frame(text)
    err = info.value
    assert (err.code, err.close_code, err.reason) == ("invalid_message", 4400, "invalid_message")
    assert err.frame_type == frame_type
    assert fragment in err.detail


def test_invalid_message_detail_never_echoes_values() -> None:
    with pytest.raises(InvalidMessage) as info:
        parse_client_frame('{"type":"connection_init","token":["secret-token-value"]}')
    assert "secret-token-value" not in str(info.value)


def test_error_frame_omits_unset_fields() -> None:
    wire = json.loads(ErrorFrame(code="runs_unavailable").to_wire())
    assert wire == {"type": "error", "code": "runs_unavailable"}
