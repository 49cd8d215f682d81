"""JSON Schemas of the CLI's ``-o json`` output, as test_cli.py checks it against a fleet."""

from __future__ import annotations

GPU = {
    "type": "object",
    "required": [
        "index",
        "uuid",
        "name",
        "memory_total_bytes",
        "memory_used_bytes",
        "utilization_pct",
        "temperature_c",
        "power_w",
        "ecc_uncorrected",
        "healthy",
        "xids",
        "reason",
        "fake",
    ],  # fmt: skip
    "properties": {
        "index": {"type": "integer"},
        "xids": {"type": "array"},
        "healthy": {"type": "boolean"},
    },  # fmt: skip
}
ENGINE = {
    "type": "object",
    "required": [
        "id",
        "node",
        "model",
        "url",
        "pid",
        "state",
        "role",
        "kind",
        "restarts",
        "gpus",
        "routable",
    ],  # fmt: skip
}
NODE = {
    "type": "object",
    "required": [
        "id",
        "agent_url",
        "agent_version",
        "healthy",
        "lost",
        "gpus",
        "engines",
        "models",
        "fetches",
        "heartbeat_age_s",
    ],  # fmt: skip
    "properties": {
        "gpus": {"type": "array", "items": GPU},
        "heartbeat_age_s": {"type": "number", "minimum": 0},
    },  # fmt: skip
}
SCHEMAS = {
    "engines": {"type": "object", "required": ["engines"],
                "properties": {"engines": {"type": "array", "items": ENGINE}}},
    "nodes": {"type": "object", "required": ["nodes"],
              "properties": {"nodes": {"type": "array", "items": NODE}}},
    "deployments": {"type": "object", "required": ["deployments"], "properties": {
        "deployments": {"type": "array", "items": {"type": "object", "required": [
            "name", "servedModelNames", "desired", "placed", "ready", "engines", "reasons"]}}}},
    "models": {"type": "object", "required": ["models"]},
}  # fmt: skip
NODE_INSPECT = {
    "type": "object",
    "required": ["node", "engines"],
    "properties": {
        "node": {"allOf": [NODE, {"properties": {"gpus": {"type": "array", "items": {
            "required": ["engines"]}}}}]},
        "engines": {"type": "array", "items": ENGINE},
    },
}  # fmt: skip
KV_STATS = {
    "type": "object",
    "required": ["blocks", "entries", "max_entries", "engines", "stats", "relay",
                 "agentsUnreachable"],  # fmt: skip
    "properties": {
        "engines": {"type": "array", "items": {"type": "object", "required": [
            "engine_id", "model", "blocks", "events", "batches"]}},
        "relay": {"type": "object", "additionalProperties": {"type": "object", "required": [
            "gaps", "replays", "replayedBatches", "resyncs"]}},
    },
}  # fmt: skip


__all__ = ["ENGINE", "GPU", "KV_STATS", "NODE", "NODE_INSPECT", "SCHEMAS"]
