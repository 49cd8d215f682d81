"""Request validation (fleet.coordinator.validation): what reaches an engine, and what is refused.

Each rejection asserts the ``param`` the client is told about and a fragment of the message, so a
client can tell what to fix. Acceptances assert the :class:`ParsedRequest` fields.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from fleet.coordinator.errors import InvalidRequest
from fleet.coordinator.validation import (
    ParsedRequest,
    RequestKind,
    parse_json_object,
    validate,
)

COMPLETION: dict[str, Any] = {"model": "m", "prompt": "hello"}
CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def body(base: dict[str, Any], **changes: Any) -> bytes:
    """Return ``base`` with ``changes`` applied as JSON bytes (a ``...`` value removes the key)."""
    data = dict(base)
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    return json.dumps(data).encode()


def rejected(kind: RequestKind, raw: bytes, **kwargs: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        validate(kind, raw, **kwargs)
    err = info.value
    assert err.status == 400
    assert err.type == "invalid_request_error"
    return err


# -- the body as a whole -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "empty"),
        (b"  \r\n\t ", "empty"),
        (b'{"model": "m\xff"}', "UTF-8"),
        (b"{model: m}", "not valid JSON"),
        (b'{"model": "m",', "not valid JSON"),
        (b"[1, 2]", "not an array"),
        (b'"a string"', "not a string"),
        (b"42", "not a number"),
        (b"null", "not null"),
        (b"true", "not a boolean"),
    ],
)
@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_body_that_is_not_a_json_object_is_rejected(
    kind: RequestKind, raw: bytes, fragment: str
) -> None:
    err = rejected(kind, raw)
    assert err.param is None
    assert fragment in err.message


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "m", "prompt": "x", "temperature": NaN}',
        b'{"model": "m", "prompt": "x", "temperature": Infinity}',
        b'{"model": "m", "prompt": "x", "temperature": -Infinity}',
        b'{"model": "m", "prompt": "x", "temperature": 1e999}',
        b'{"model": "m", "prompt": "x", "temperature": -1e999}',
        b'{"model": "m", "prompt": "x", "logit_bias": {"5": NaN}}',
        b'{"model": "m", "prompt": "x", "extra": [1, [2, {"deep": Infinity}]]}',
        b'{"model": "m", "prompt": "x", "extra": {"a": [{"b": 1e999}]}}',
        b'{"model": NaN, "prompt": "x"}',
    ],
)
def test_non_finite_numbers_anywhere_are_rejected(raw: bytes) -> None:
    err = rejected("completion", raw)
    assert "Non-finite" in err.message or "out of range" in err.message


def test_large_finite_numbers_and_big_integers_are_accepted() -> None:
    raw = b'{"model": "m", "prompt": "x", "extra": [1e308, -1e308, 12345678901234567890123]}'
    assert validate("completion", raw).body["extra"][2] == 12345678901234567890123


def test_an_integer_past_pythons_digit_limit_is_a_400_not_a_500() -> None:
    raw = b'{"model": "m", "prompt": "x", "seed": ' + b"9" * 5000 + b"}"
    err = rejected("completion", raw)
    assert err.status == 400 and "cannot be read" in err.message


def test_deeply_nested_body_is_rejected_not_crashed() -> None:
    raw = b'{"model": "m", "prompt": "x", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    err = rejected("completion", raw)
    assert "nested too deeply" in err.message


def test_parse_json_object_returns_the_object() -> None:
    assert parse_json_object(b' {"a": [1, 2.5, "x"]} ') == {"a": [1, 2.5, "x"]}


# -- model -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        (..., "must provide a model"),
        (None, "must provide a model"),
        ("", "non-empty string"),
        (3, "non-empty string"),
        (["m"], "non-empty string"),
        ({"name": "m"}, "non-empty string"),
        (True, "non-empty string"),
    ],
)
@pytest.mark.parametrize("base", [COMPLETION, CHAT], ids=["completion", "chat"])
def test_bad_model_is_rejected(base: dict[str, Any], model: Any, fragment: str) -> None:
    kind: RequestKind = "completion" if "prompt" in base else "chat"
    err = rejected(kind, body(base, model=model))
    assert err.param == "model"
    assert fragment in err.message


# -- prompt ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "fragment"),
    [
        (..., "must provide a prompt"),
        (None, "got null"),
        (7, "got a number"),
        (1.5, "got a number"),
        (True, "got a boolean"),
        ({"text": "x"}, "got an object"),
        ([], "got an array"),
        (["a", 1], "got an array"),
        ([1, "a"], "got an array"),
        ([1, -2], "got an array"),
        ([1, 2.0], "got an array"),
        ([1, True], "got an array"),
        ([[1, 2], []], "got an array"),
        ([[]], "got an array"),
        ([[1, -1]], "got an array"),
        ([[1], "a"], "got an array"),
        ([[1], [[2]]], "got an array"),
        ([None], "got an array"),
    ],
)
def test_bad_prompt_is_rejected(prompt: Any, fragment: str) -> None:
    err = rejected("completion", body(COMPLETION, prompt=prompt))
    assert err.param == "prompt"
    assert fragment in err.message
    if prompt is not ...:
        assert "array of token ids" in err.message


@pytest.mark.parametrize(
    "prompt",
    ["", "hello", ["a"], ["a", ""], [0], [1, 2, 3], [[1], [2, 3]], [[0]]],
    ids=repr,
)
def test_every_valid_prompt_form_is_accepted(prompt: Any) -> None:
    parsed = validate("completion", body(COMPLETION, prompt=prompt))
    assert parsed.kind == "completion"
    assert parsed.body["prompt"] == prompt


def test_completion_does_not_require_messages_and_chat_does_not_require_prompt() -> None:
    assert validate("completion", body(COMPLETION)).kind == "completion"
    assert validate("chat", body(CHAT)).kind == "chat"
    assert rejected("completion", body(CHAT)).param == "prompt"
    assert rejected("chat", body(COMPLETION)).param == "messages"


# -- messages ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "param", "fragment"),
    [
        (..., "messages", "must provide `messages`"),
        (None, "messages", "must provide `messages`"),
        ([], "messages", "got an array"),
        ("hi", "messages", "got a string"),
        ({"role": "user"}, "messages", "got an object"),
        (3, "messages", "got a number"),
        (["hi"], "messages[0]", "must be an object"),
        ([{"role": "user", "content": "a"}, None], "messages[1]", "must be an object"),
        ([{"content": "hi"}], "messages[0].role", "missing `role`"),
        ([{"role": "user"}, {"role": None}], "messages[1].role", "missing `role`"),
        ([{"role": "robot", "content": "x"}], "messages[0].role", "'robot'"),
        ([{"role": "", "content": "x"}], "messages[0].role", "must be one of"),
        ([{"role": 1, "content": "x"}], "messages[0].role", "must be one of"),
        ([{"role": "User", "content": "x"}], "messages[0].role", "'User'"),
        ([{"role": "user", "content": 5}], "messages[0].content", "string or an array"),
        ([{"role": "user", "content": {"t": "x"}}], "messages[0].content", "string or an array"),
        ([{"role": "user", "content": True}], "messages[0].content", "string or an array"),
    ],
)
def test_bad_messages_are_rejected(messages: Any, param: str, fragment: str) -> None:
    err = rejected("chat", body(CHAT, messages=messages))
    assert err.param == param
    assert fragment in err.message


def test_bad_role_message_lists_the_roles_and_truncates_a_long_role() -> None:
    err = rejected("chat", body(CHAT, messages=[{"role": "x" * 1000}]))
    assert "'assistant'" in err.message and "'user'" in err.message
    assert "x" * 100 not in err.message


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        [{"role": "assistant", "content": None, "tool_calls": []}],
        [{"role": "assistant"}],
        [{"role": r, "content": "x"} for r in ("tool", "developer", "function")],
    ],
)
def test_valid_messages_are_accepted(messages: Any) -> None:
    parsed = validate("chat", body(CHAT, messages=messages))
    assert parsed.kind == "chat"
    assert parsed.body["messages"] == messages


# -- token limits ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (0, "at least 1; got 0"),
        (-5, "at least 1; got -5"),
        (1.0, "must be an integer"),
        (2.5, "must be an integer"),
        (True, "must be an integer"),
        (False, "must be an integer"),
        ("16", "must be an integer"),
        ([16], "must be an integer"),
        (2049, "context length of 2048"),
    ],
)
def test_bad_token_limit_is_rejected(key: str, value: Any, fragment: str) -> None:
    err = rejected("completion", body(COMPLETION, **{key: value}), max_model_len=2048)
    assert err.param == key
    assert fragment in err.message


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
def test_token_limit_up_to_the_context_length_is_accepted(key: str) -> None:
    raw = body(COMPLETION, **{key: 2048})
    assert validate("completion", raw, max_model_len=2048).max_tokens == 2048
    assert validate("completion", body(COMPLETION, **{key: 10**6})).max_tokens == 10**6


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, None),
        ({"max_tokens": None}, None),
        ({"max_tokens": 7}, 7),
        ({"max_completion_tokens": 9}, 9),
        ({"max_tokens": 7, "max_completion_tokens": 9}, 7),
        ({"max_tokens": 9, "max_completion_tokens": 7}, 7),
    ],
)
def test_max_tokens_is_the_smaller_of_the_two_limits(
    changes: dict[str, Any], expected: int | None
) -> None:
    assert validate("chat", body(CHAT, **changes)).max_tokens == expected


# -- stream and stream_options ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "param", "fragment"),
    [
        ({"stream": "true"}, "stream", "`stream` must be a boolean"),
        ({"stream": 1}, "stream", "`stream` must be a boolean"),
        ({"stream_options": True}, "stream_options", "must be an object"),
        ({"stream_options": []}, "stream_options", "must be an object"),
        ({"stream_options": "x"}, "stream_options", "must be an object"),
        (
            {"stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
            "`stream_options.include_usage` must be a boolean",
        ),
        (
            {"stream_options": {"include_usage": 1}},
            "stream_options.include_usage",
            "must be a boolean",
        ),
    ],
)
@pytest.mark.parametrize("base", [COMPLETION, CHAT], ids=["completion", "chat"])
def test_bad_stream_fields_are_rejected(
    base: dict[str, Any], changes: dict[str, Any], param: str, fragment: str
) -> None:
    kind: RequestKind = "completion" if "prompt" in base else "chat"
    err = rejected(kind, body(base, **changes))
    assert err.param == param
    assert fragment in err.message


@pytest.mark.parametrize(
    ("changes", "stream", "include_usage"),
    [
        ({}, False, False),
        ({"stream": None, "stream_options": None}, False, False),
        ({"stream": False}, False, False),
        ({"stream": True}, True, False),
        ({"stream": True, "stream_options": {}}, True, False),
        ({"stream": True, "stream_options": {"include_usage": True}}, True, True),
        ({"stream": True, "stream_options": {"include_usage": False}}, True, False),
        ({"stream": True, "stream_options": {"include_usage": None}}, True, False),
    ],
)
def test_stream_and_include_usage_are_parsed(
    changes: dict[str, Any], stream: bool, include_usage: bool
) -> None:
    parsed = validate("chat", body(CHAT, **changes))
    assert (parsed.stream, parsed.include_usage) == (stream, include_usage)


# -- sampling parameters -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "param", "fragment"),
    [
        ({"temperature": -0.1}, "temperature", "within [0.0, 100.0]; got -0.1"),
        ({"temperature": 100.5}, "temperature", "within [0.0, 100.0]"),
        ({"temperature": "0.7"}, "temperature", "must be a number"),
        ({"temperature": True}, "temperature", "must be a number"),
        ({"temperature": [1]}, "temperature", "must be a number"),
        ({"top_p": 1.01}, "top_p", "within [0.0, 1.0]"),
        ({"top_p": -1}, "top_p", "within [0.0, 1.0]; got -1"),
        ({"top_p": "1"}, "top_p", "must be a number"),
        ({"presence_penalty": 2.5}, "presence_penalty", "within [-2.0, 2.0]"),
        ({"frequency_penalty": -3}, "frequency_penalty", "within [-2.0, 2.0]"),
        ({"frequency_penalty": False}, "frequency_penalty", "must be a number"),
        ({"n": 0}, "n", "from 1 to 128"),
        ({"n": -1}, "n", "from 1 to 128"),
        ({"n": 129}, "n", "from 1 to 128"),
        ({"n": 2.0}, "n", "from 1 to 128"),
        ({"n": True}, "n", "from 1 to 128"),
        ({"n": "2"}, "n", "from 1 to 128"),
        ({"seed": 1.5}, "seed", "must be an integer"),
        ({"seed": True}, "seed", "must be an integer"),
        ({"top_k": "5"}, "top_k", "must be an integer"),
        ({"top_logprobs": 2.0}, "top_logprobs", "must be an integer"),
        ({"logprobs": "yes"}, "logprobs", "must be an integer"),
        ({"logprobs": 1.5}, "logprobs", "must be an integer"),
    ],
)
def test_bad_sampling_parameters_are_rejected(
    changes: dict[str, Any], param: str, fragment: str
) -> None:
    err = rejected("completion", body(COMPLETION, **changes))
    assert err.param == param
    assert fragment in err.message


@pytest.mark.parametrize(
    "changes",
    [
        {"temperature": 0},
        {"temperature": 0.0},
        {"temperature": 100},
        {"top_p": 0},
        {"top_p": 1.0},
        {"presence_penalty": -2},
        {"frequency_penalty": 2.0},
        {"n": 1},
        {"n": 128},
        {"seed": -7},
        {"top_k": -1},
        {"top_logprobs": 5},
        {"logprobs": 3},
        {"logprobs": True},
        {"logprobs": False},
        {"temperature": None, "top_p": None, "n": None, "seed": None},
    ],
)
def test_valid_sampling_parameters_are_accepted(changes: dict[str, Any]) -> None:
    parsed = validate("completion", body(COMPLETION, **changes))
    for key, value in changes.items():
        assert parsed.body[key] == value


# -- the parsed request ------------------------------------------------------------------------


def test_parsed_request_carries_the_whole_body() -> None:
    data = {
        "model": "qwen",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 12,
        "temperature": 0.5,
        "unknown_field": {"left": "to the engine"},
    }
    parsed = validate("chat", json.dumps(data).encode(), max_model_len=64)
    assert parsed == ParsedRequest(
        kind="chat",
        model="qwen",
        stream=True,
        include_usage=True,
        max_tokens=12,
        body=data,
    )


def test_model_is_checked_before_the_prompt() -> None:
    err = rejected("completion", json.dumps({"prompt": 5}).encode())
    assert err.param == "model"
