"""The wire protocol published from impl/frames.py: JSON Schemas and an AsyncAPI 3 document.

impl/frames.py is the single source of the frame shapes (its docstring: "the JSON Schemas /
AsyncAPI document are generated from it"). This module derives, deterministically:

* ``protocol/frames/<type>.schema.json``: one JSON Schema (draft 2020-12, pydantic's output)
  per frame, with ``type`` required: the server dispatches on it (docs/protocol.md, Transport),
  even though the Python models give it a default;
* ``protocol/asyncapi.json``: an AsyncAPI 3.0.0 document of the ``/v1/ws`` channel seen from
  the server (it receives client frames and sends server frames), with request/reply pairs,
  each frame's example, and the close-code table (docs/protocol.md, "Close codes at a glance")
  both in the channel description and as the ``x-close-codes`` extension.

The document validates against the AsyncAPI 3.0.0 JSON Schema vendored in
``src/pipeproof/drawing/schemas/`` (tests/drawing/test_protocol.py).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from typing import Any

from pydantic.json_schema import models_json_schema

from pipeproof.protocol import CloseReason, close_table_markdown
from pipeproof.protocol.frames import CLIENT_FRAME_MODELS, SERVER_FRAME_MODELS

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
ASYNCAPI_PATH = "protocol/asyncapi.json"


@dataclass(frozen=True)
class FrameInfo:
    """One frame type as the report lists it."""

    type: str
    model: str
    direction: str  # "client -> server" | "server -> client"
    summary: str
    fields: tuple[tuple[str, str, bool], ...]  # (name, JSON type, required)
    example: dict[str, Any]
    schema_path: str


def _frame_type(model: Any) -> str:
    return str(model.model_fields["type"].default)


def _doc(model: Any) -> str:
    return " ".join((inspect.getdoc(model) or "").split())


def _required_type(schema: dict[str, Any]) -> dict[str, Any]:
    schema = dict(schema)
    schema["required"] = ["type", *[r for r in schema.get("required", []) if r != "type"]]
    return schema


def frame_schema(model: Any) -> dict[str, Any]:
    """The standalone JSON Schema of one frame model."""
    schema = _required_type(model.model_json_schema(by_alias=True, mode="validation"))
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


def frames() -> list[FrameInfo]:
    out = []
    for direction, models in (("client -> server", CLIENT_FRAME_MODELS), ("server -> client", SERVER_FRAME_MODELS)):
        for model in models:
            schema = frame_schema(model)
            props = schema.get("properties", {})
            fields = tuple(
                (name, _json_type(spec), name in schema["required"]) for name, spec in props.items()
            )
            t = _frame_type(model)
            out.append(FrameInfo(t, model.__name__, direction, _doc(model), fields, model.json_example(),
                                 f"protocol/frames/{t}.schema.json"))
    return out


def _json_type(spec: dict[str, Any]) -> str:
    if "const" in spec:
        return json.dumps(spec["const"])
    if "$ref" in spec:
        return str(spec["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in spec:
        return " | ".join(_json_type(s) for s in spec["anyOf"])
    if spec.get("type") == "array":
        return f"array of {_json_type(spec.get('items', {}))}"
    if "enum" in spec:
        return " | ".join(json.dumps(v) for v in spec["enum"])
    return str(spec.get("type", "any"))


def _message_key(frame_type: str) -> str:
    return frame_type.replace(".", "_")


REPLIES: dict[str, tuple[str, ...]] = {
    # request -> the server frames that answer it (docs/protocol.md sections 1, 4, 5)
    "connection_init": ("connection_ack",),
    "run.start": ("run.accepted", "error"),
}


def asyncapi_document() -> dict[str, Any]:
    models = [*CLIENT_FRAME_MODELS, *SERVER_FRAME_MODELS]
    _, top = models_json_schema([(m, "validation") for m in models], by_alias=True,
                                ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = dict(top["$defs"])
    for m in models:
        schemas[m.__name__] = _required_type(schemas[m.__name__])
    messages: dict[str, Any] = {}
    for m in models:
        t = _frame_type(m)
        messages[_message_key(t)] = {
            "name": t,
            "title": m.__name__,
            "summary": _doc(m),
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{m.__name__}"},
            "examples": [{"name": f"{_message_key(t)}_example", "payload": m.json_example()}],
        }
    channel_messages = {k: {"$ref": f"#/components/messages/{k}"} for k in messages}
    operations: dict[str, Any] = {}
    for direction, group in (("receive", CLIENT_FRAME_MODELS), ("send", SERVER_FRAME_MODELS)):
        for m in group:
            t = _frame_type(m)
            op: dict[str, Any] = {
                "action": direction,
                "channel": {"$ref": "#/channels/ws"},
                "summary": f"{'The client sends' if direction == 'receive' else 'The server sends'} `{t}`.",
                "messages": [{"$ref": f"#/channels/ws/messages/{_message_key(t)}"}],
            }
            if t in REPLIES:
                op["reply"] = {
                    "channel": {"$ref": "#/channels/ws"},
                    "messages": [{"$ref": f"#/channels/ws/messages/{_message_key(r)}"} for r in REPLIES[t]],
                }
            operations[f"{direction}_{_message_key(t)}"] = op
    return {
        "asyncapi": "3.0.0",
        "id": "urn:pipeproof:protocol:v1",
        "info": {
            "title": "pipeproof wire protocol",
            "version": "1",
            "description": (
                "The WebSocket protocol of pipeproof's reference server (docs/protocol.md), described from "
                "the server's side: it receives client frames and sends server frames on `/v1/ws`. "
                "Generated from pipeproof/impl/frames.py by `pipeproof diagrams`; do not edit."
            ),
            "license": {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "localhost:8000",
                "protocol": "ws",
                "description": "`pipeproof serve` on its default address",
            },
        },
        "channels": {
            "ws": {
                "address": "/v1/ws",
                "title": "The agent-chat socket",
                "description": (
                    "One JSON object per text frame, with a string field `type`; unknown fields are ignored. "
                    "The first frame must be `connection_init`; frames sent before `connection_ack` are "
                    "buffered and handled once the socket is READY. The server closes the socket with one "
                    "of these codes:\n\n" + close_table_markdown()
                ),
                "servers": [{"$ref": "#/servers/local"}],
                "messages": channel_messages,
                "x-close-codes": [
                    {"code": int(c.code), "reason": c.value, "meaning": c.meaning, "client_should": c.reaction.value}
                    for c in CloseReason
                ],
            },
        },
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }


def dump(data: object) -> bytes:
    """Deterministic JSON bytes (sorted keys keep reorderings of pydantic output out of diffs)."""
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode()


def protocol_files() -> dict[str, bytes]:
    files = {ASYNCAPI_PATH: dump(asyncapi_document())}
    for f in frames():
        model = next(m for m in (*CLIENT_FRAME_MODELS, *SERVER_FRAME_MODELS) if _frame_type(m) == f.type)
        files[f.schema_path] = dump(frame_schema(model))
    return files
