"""Profile handlers and prefill/decode deciders, under llm-d's type and parameter names.

A profile handler says which scheduling profiles run for a request; a decider says whether a
request's prefill runs on a separate prefill engine. Taken from llm-d-inference-scheduler
``pkg/epp/framework/plugins/scheduling/profilehandler/`` (``single/``, ``disagg/``):

=================================  =========================================================
type                               what it does in Fleet
=================================  =========================================================
single-profile-handler             one profile; its pick is the request's engine (the
                                   default when a config has one profile and no handler)
disagg-profile-handler             the decode profile picks the engine that answers (first,
                                   as llm-d); then, if ``deciders.prefill`` names a decider
                                   and it says so, the prefill profile picks a prefill
                                   engine. ``profiles`` (``decode``: "decode", ``prefill``:
                                   "prefill"), ``deciders`` (``prefill``); the deprecated flat
                                   form (``decodeProfile``, ``prefillProfile``,
                                   ``prefillDeciderPluginName``, ``deciderPluginName``) too,
                                   but not both forms at once. No prefill decider: decode
                                   only. An encode decider is refused (Fleet has no encode
                                   stage)
pd-profile-handler (deprecated)    the same handler; its decider is ``deciderPluginName``,
                                   else the older ``threshold``: 0 (the default) splits every
                                   request, N splits when the prompt's non-cached part is at
                                   least N characters (llm-d compared an estimate of
                                   characters; Fleet counts tokens, at llm-d's 4 characters
                                   a token: ceil(N / 4) tokens); a declared
                                   ``prefix-based-pd-decider`` when neither is given
prefix-based-pd-decider            split when the prompt's tokens not cached on the chosen
                                   decode engine (prompt tokens − the prefix it holds, from
                                   the KV index) are at least ``nonCachedTokens``; 0 (llm-d's
                                   default) never splits
always-disagg-pd-decider           split every request
=================================  =========================================================

With a split, the prefill profile runs over the request's candidates without the chosen decode
engine (prefilling on the engine that decodes is no split); when it finds none, the request is
decode only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from fleet.protocol.errors import ConfigError

from .plugins import Params, Plugin

# llm-d's pd-profile-handler estimated a prompt's tokens at this many characters each
# (disagg/prefix_based_pd_decider.go: AverageCharactersPerToken).
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class Split:
    """The P/D part of a scheduling decision.

    Attributes:
        decider: the decider's plugin name.
        split: True when the prefill runs on a separate prefill engine.
        reason: why (for route explain and logs).
        prompt_tokens: the prompt's token count (None: not tokenized).
        cached_tokens: the prompt's tokens the chosen decode engine holds.
    """

    decider: str
    split: bool
    reason: str
    prompt_tokens: int | None
    cached_tokens: int

    def as_json(self) -> dict[str, Any]:
        return {
            "decider": self.decider,
            "split": self.split,
            "reason": self.reason,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
        }


class Decider(Plugin):
    """Whether a request's prefill runs on a prefill engine."""

    KIND = "decider"
    NEEDS_TOKENS: ClassVar[bool] = False

    def decide(self, prompt_tokens: int | None, cached_tokens: int) -> Split:
        """Decide for a prompt of ``prompt_tokens`` (None: unknown) with ``cached_tokens`` on
        the chosen decode engine."""
        raise NotImplementedError


class PrefixBasedPDDecider(Decider):
    TYPE = "prefix-based-pd-decider"
    PARAMS = ("nonCachedTokens",)
    NEEDS_TOKENS = True

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        non_cached = params.integer("nonCachedTokens", 0)  # llm-d's default: 0
        assert non_cached is not None
        self.non_cached_tokens = non_cached
        if non_cached == 0:
            self.notes.append(
                f"plugins[{name}].parameters.nonCachedTokens is 0 (llm-d's default): "
                "no request is split"
            )

    def decide(self, prompt_tokens: int | None, cached_tokens: int) -> Split:
        threshold = self.non_cached_tokens
        if threshold == 0:
            return Split(self.name, False, "nonCachedTokens is 0", prompt_tokens, cached_tokens)
        if prompt_tokens is None:
            why = "the prompt was not tokenized"
            return Split(self.name, False, why, prompt_tokens, cached_tokens)
        non_cached = prompt_tokens - cached_tokens
        split = non_cached >= threshold
        why = f"{non_cached} non-cached tokens {'>=' if split else '<'} {threshold}"
        return Split(self.name, split, why, prompt_tokens, cached_tokens)


class AlwaysDisaggPDDecider(Decider):
    TYPE = "always-disagg-pd-decider"

    def decide(self, prompt_tokens: int | None, cached_tokens: int) -> Split:
        return Split(self.name, True, "always", prompt_tokens, cached_tokens)


class ProfileHandler(Plugin):
    """Says which profiles run: :attr:`decode_profile` always, :attr:`prefill_profile` when
    the decider (resolved by :meth:`decider_ref` at load) says so."""

    KIND = "handler"
    decode_profile: str | None = None  # None: the config's one profile
    prefill_profile: str | None = None

    def decider_ref(self, plugins: Mapping[str, Plugin]) -> str | Decider | None:
        """The prefill decider: a plugin name to look up, one built here, or None (no split)."""
        return None


class SingleProfileHandler(ProfileHandler):
    TYPE = "single-profile-handler"


class DisaggProfileHandler(ProfileHandler):
    TYPE = "disagg-profile-handler"
    NESTED: ClassVar[tuple[str, ...]] = ("profiles", "deciders")
    # The deprecated flat parameters (disagg/disagg_profile_handler.go,
    # legacyDisaggProfileHandlerParameters), and pd-profile-handler's that llm-d ignores here.
    FLAT: ClassVar[tuple[str, ...]] = (
        "decodeProfile",
        "prefillProfile",
        "encodeProfile",
        "prefillDeciderPluginName",
        "encodeDeciderPluginName",
        "deciderPluginName",
    )
    IGNORED: ClassVar[tuple[str, ...]] = ("prefixPluginType", "prefixPluginName", "primaryPort")
    PARAMS = (*NESTED, *FLAT, *IGNORED)

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        where = f"plugins[{name}].parameters"
        nested = {k: params.raw[k] for k in self.NESTED if k in params.raw}
        flat = [k for k in self.FLAT if k in params.raw]
        if nested and flat:
            raise ConfigError(
                where, sorted([*nested, *flat]), "mixes the deprecated flat parameters with "
                "profiles/deciders; use one form (as llm-d requires)"
            )  # fmt: skip
        for key, value in nested.items():
            if not isinstance(value, Mapping) or not all(
                k in ("decode", "prefill", "encode") and isinstance(v, str)
                for k, v in value.items()
            ):
                why = "must map decode/prefill/encode to names"
                raise ConfigError(f"{where}.{key}", value, why)
        if "decode" in nested.get("deciders", {}):
            raise ConfigError(f"{where}.deciders", nested["deciders"], "takes prefill and encode")
        profiles: dict[str, str | None] = dict(nested.get("profiles", {}))
        deciders: dict[str, str | None] = dict(nested.get("deciders", {}))
        for key in flat:  # llm-d's toDisaggParams
            value = params.string(key)
            self.notes.append(f"{where}.{key}: deprecated in llm-d; use profiles/deciders")
            if key.endswith("Profile"):
                profiles[key.removesuffix("Profile")] = value
            elif key == "deciderPluginName":
                deciders.setdefault("prefill", value)
            else:
                deciders[key.removesuffix("DeciderPluginName")] = value
        self._ignored_params(params)
        self.decode_profile = profiles.get("decode") or "decode"
        self.prefill_profile = profiles.get("prefill") or "prefill"
        self.encode_profile = profiles.get("encode") or "encode"
        self.prefill_decider: str | None = deciders.get("prefill")
        encode = deciders.get("encode")
        if encode:
            raise ConfigError(
                f"{where}.deciders.encode", encode, f"encode disaggregation (profile "
                f"{self.encode_profile!r}) is not something Fleet does; drop the encode stage"
            )  # fmt: skip

    def _ignored_params(self, params: Params) -> None:
        where = f"plugins[{self.name}].parameters"
        for key in ("prefixPluginType", "prefixPluginName"):
            if params.string(key) is not None:
                self.notes.append(
                    f"{where}.{key}: accepted, no effect: the decider reads the prefix the "
                    "chosen engine holds from Fleet's KV index"
                )
        if "primaryPort" in params.raw:
            self.notes.append(
                f"{where}.primaryPort: accepted, no effect (deprecated in llm-d): Fleet sends "
                "each request to its engine's own address"
            )

    def decider_ref(self, plugins: Mapping[str, Plugin]) -> str | Decider | None:
        if not self.prefill_decider:
            self.notes.append(
                f"plugins[{self.name}]: no deciders.prefill, so no request is split (as in llm-d)"
            )
        return self.prefill_decider


class PdProfileHandler(DisaggProfileHandler):
    """llm-d's deprecated ``pd-profile-handler`` (disagg/pd_profile_handler.go), with the
    parameters it has had: ``threshold`` and ``hashBlockSize`` before llm-d's deciders
    (3ed3d5c6, "Extend support for different ways to decide..."), ``deciderPluginName`` after."""

    TYPE = "pd-profile-handler"
    FLAT = ("decodeProfile", "prefillProfile", "deciderPluginName")
    PARAMS = (*FLAT, "threshold", "hashBlockSize", *DisaggProfileHandler.IGNORED)

    def __init__(self, name: str, params: Params) -> None:
        Plugin.__init__(self, name, params)
        where = f"plugins[{name}].parameters"
        self.notes.append(f"plugins[{name}]: pd-profile-handler is deprecated in llm-d; "
                          "use disagg-profile-handler")  # fmt: skip
        self.decode_profile = params.string("decodeProfile") or "decode"
        self.prefill_profile = params.string("prefillProfile") or "prefill"
        self.prefill_decider = params.string("deciderPluginName")
        self.threshold = params.integer("threshold", None, low=0)
        if params.integer("hashBlockSize", None, low=1) is not None:
            self.notes.append(
                f"{where}.hashBlockSize: accepted, no effect: Fleet matches prefixes in each "
                "engine's own KV block size"
            )
        self._ignored_params(params)

    def decider_ref(self, plugins: Mapping[str, Plugin]) -> str | Decider | None:
        if self.prefill_decider:
            return self.prefill_decider
        if self.threshold is None and PrefixBasedPDDecider.TYPE in plugins:
            return PrefixBasedPDDecider.TYPE  # llm-d's default deciderPluginName
        threshold = self.threshold or 0
        if threshold == 0:
            self.notes.append(f"plugins[{self.name}]: threshold 0: every request is split")
            return AlwaysDisaggPDDecider(self.name, Params(self.name, None, ()))
        tokens = math.ceil(threshold / CHARS_PER_TOKEN)
        self.notes.append(
            f"plugins[{self.name}].parameters.threshold: {threshold} characters; Fleet counts "
            f"tokens, so it splits at {tokens} non-cached prompt tokens (llm-d's 4 characters "
            "a token)"
        )
        return PrefixBasedPDDecider(
            self.name, Params(self.name, {"nonCachedTokens": tokens}, ("nonCachedTokens",))
        )


TYPES: tuple[type[Plugin], ...] = (
    SingleProfileHandler,
    DisaggProfileHandler,
    PdProfileHandler,
    PrefixBasedPDDecider,
    AlwaysDisaggPDDecider,
)

__all__ = [
    "TYPES",
    "AlwaysDisaggPDDecider",
    "Decider",
    "DisaggProfileHandler",
    "PdProfileHandler",
    "PrefixBasedPDDecider",
    "ProfileHandler",
    "SingleProfileHandler",
    "Split",
]
