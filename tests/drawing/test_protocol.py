"""The published protocol validates: AsyncAPI 3 against its JSON Schema, examples against frame schemas."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest

from pipeproof.drawing.protocol import ASYNCAPI_PATH, asyncapi_document, frame_schema, frames, protocol_files
from pipeproof.protocol import CloseReason
from pipeproof.protocol.frames import CLIENT_FRAME_MODELS, SERVER_FRAME_MODELS

SCHEMA = Path(__file__).resolve().parents[2] / "src" / "pipeproof" / "drawing" / "schemas" / "asyncapi-3.0.0.json"


@pytest.fixture(scope="module")
def asyncapi_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    assert schema["properties"]["asyncapi"]["const"] == "3.0.0"
    return jsonschema.Draft7Validator(schema)


def test_asyncapi_document_validates(asyncapi_validator):
    errors = sorted(asyncapi_validator.iter_errors(asyncapi_document()), key=str)
    assert not errors, [e.message for e in errors[:5]]


def test_the_schema_is_not_vacuous(asyncapi_validator):
    doc = copy.deepcopy(asyncapi_document())
    doc["operations"]["receive_ack"]["action"] = "publish"  # an AsyncAPI 2 word
    assert list(asyncapi_validator.iter_errors(doc))
    doc = copy.deepcopy(asyncapi_document())
    del doc["info"]["version"]
    assert list(asyncapi_validator.iter_errors(doc))


def test_asyncapi_describes_the_channel_and_every_frame():
    doc = asyncapi_document()
    channel = doc["channels"]["ws"]
    assert channel["address"] == "/v1/ws"
    types = {m.model_fields["type"].default for m in (*CLIENT_FRAME_MODELS, *SERVER_FRAME_MODELS)}
    assert {m["name"] for m in doc["components"]["messages"].values()} == types
    actions = {op["action"] for op in doc["operations"].values()}
    assert actions == {"send", "receive"}
    assert {(c["code"], c["reason"]) for c in channel["x-close-codes"]} == {(int(c.code), c.value) for c in CloseReason}
    assert "| 4429 | `duplicate_init` |" in channel["description"]


@pytest.mark.parametrize("model", [*CLIENT_FRAME_MODELS, *SERVER_FRAME_MODELS], ids=lambda m: m.__name__)
def test_every_example_validates_against_its_schema(model):
    schema = frame_schema(model)
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(model.json_example())
    assert "type" in schema["required"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate({k: v for k, v in model.json_example().items() if k != "type"})


def test_asyncapi_examples_validate_against_the_component_schemas():
    doc = asyncapi_document()
    for message in doc["components"]["messages"].values():
        name = message["payload"]["$ref"].rsplit("/", 1)[-1]
        schema = {**doc["components"]["schemas"][name], "components": doc["components"]}
        for example in message["examples"]:
            jsonschema.Draft202012Validator(schema).validate(example["payload"])


def test_protocol_files_cover_every_frame():
    files = protocol_files()
    assert ASYNCAPI_PATH in files
    for f in frames():
        assert f.schema_path in files
