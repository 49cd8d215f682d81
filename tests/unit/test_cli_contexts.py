"""Where the CLI connects: the contexts file's parsing and the precedence flag > environment >
context > default (fleet/clicontexts.py), and the contexts file's I/O (fleet/cliconfig.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.cliconfig import load, save
from fleet.clicontexts import (
    DEFAULT_COORDINATOR,
    Context,
    Contexts,
    contexts_path,
    parse_contexts,
    resolve,
    to_document,
)
from fleet.protocol.errors import ConfigError

CONTEXTS = Contexts(
    {
        "local": Context("http://127.0.0.1:8080"),
        "prod": Context("http://127.0.0.1:18080", admin_key_file="/keys/prod"),
    },
    current="prod",
)
KEYS = {"/keys/prod": "prod-key"}


def read_key(path: str, context: str) -> str:
    return KEYS[path]


def test_precedence_is_flag_then_env_then_context_then_default() -> None:
    env = {"FLEET_COORDINATOR": "http://env:1", "FLEET_ADMIN_KEY": "env-key"}
    flag = resolve(CONTEXTS, env, coordinator="http://flag:1/", admin_key="k", read_key=read_key)
    assert (flag.coordinator, flag.admin_key, flag.source) == ("http://flag:1", "k", "flag")
    by_env = resolve(CONTEXTS, env, read_key=read_key)
    assert (by_env.coordinator, by_env.admin_key, by_env.source) == (
        "http://env:1", "env-key", "env",
    )  # fmt: skip
    by_context = resolve(CONTEXTS, {}, read_key=read_key)
    assert (by_context.coordinator, by_context.admin_key, by_context.source) == (
        "http://127.0.0.1:18080", "prod-key", "context prod",
    )  # fmt: skip
    chosen = resolve(CONTEXTS, {}, context="local", read_key=read_key)
    assert (chosen.coordinator, chosen.admin_key) == ("http://127.0.0.1:8080", "")
    default = resolve(Contexts(), {})
    assert (default.coordinator, default.admin_key, default.source) == (
        DEFAULT_COORDINATOR, "", "default",
    )  # fmt: skip


def test_a_contexts_key_goes_only_to_its_own_coordinator() -> None:
    other = resolve(CONTEXTS, {}, coordinator="http://elsewhere:1", read_key=read_key)
    assert other.admin_key == ""
    same = resolve(CONTEXTS, {}, coordinator="http://127.0.0.1:18080", read_key=read_key)
    assert same.admin_key == "prod-key"
    no_key = resolve(CONTEXTS, {}, want_key=False, read_key=lambda p, c: 1 / 0)
    assert no_key.admin_key == ""  # a command without an admin key reads no key file


def test_bad_settings_name_their_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--context='nope'.*known: local, prod"):
        resolve(CONTEXTS, {}, context="nope")
    with pytest.raises(ConfigError, match=r"\$FLEET_COORDINATOR='localhost:8080'"):
        resolve(Contexts(), {"FLEET_COORDINATOR": "localhost:8080"})
    with pytest.raises(ConfigError, match="contexts.prod.admin-key-file='/no/such/key'"):
        resolve(Contexts({"prod": Context("http://a:1", "/no/such/key")}, "prod"), {})
    cases = [
        ({"contexts": {"a": {"coordinator": "http://a:1", "colour": 1}}}, "contexts.a.colour"),
        ({"contexts": {"a": {"coordinator": "tcp://a:1"}}}, "contexts.a.coordinator"),
        ({"contexts": {"a": "http://a:1"}}, "contexts.a="),
        ({"current-context": "b", "contexts": {"a": {"coordinator": "http://a:1"}}},
         "current-context='b'"),
        ({"context": {}}, "f: context"),
        ([1], "must be a mapping"),
    ]  # fmt: skip
    for doc, field in cases:
        with pytest.raises(ConfigError, match=field):
            parse_contexts(doc, "f")


def test_the_file_round_trips_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "contexts.yaml"
    assert load(path) == Contexts()
    save(path, CONTEXTS)
    assert load(path) == CONTEXTS
    assert path.stat().st_mode & 0o777 == 0o600
    assert to_document(CONTEXTS)["current-context"] == "prod"
    path.write_text("contexts: [")
    with pytest.raises(ConfigError, match="is not YAML"):
        load(path)
    assert contexts_path({"FLEET_CONFIG": str(path)}) == path
    assert contexts_path({}).name == "contexts.yaml"
