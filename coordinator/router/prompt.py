"""A request's prompt as the engine will tokenize it, cut into Fleet's block keys.

Chat requests go through the model's chat template exactly as vLLM renders them
(:class:`fleet.protocol.vllm_tokenizer.VllmTokenizer`); completions are tokenized with special
tokens unless ``add_special_tokens`` is false; token-id prompts are taken as they are. A prompt
that cannot be tokenized here (no tokenizer for the model, a template error, several prompts) is
routed without prefix information: the engine still answers it with its own error if it is bad.

Tokenizers are loaded once per model, in a worker thread, and cached. A model whose source is
remote (``hf://``, ``s3://``, ``http(s)://``) has no tokenizer until the coordinator has fetched
its tokenizer files (:mod:`fleet.coordinator.tokenizers`), which then calls
:meth:`PromptTokenizer.set_folder`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from fleet.protocol.errors import ConfigError
from fleet.protocol.vllm_tokenizer import ChatTemplateError, VllmTokenizer

from ..kvindex import BlockKeys

log = logging.getLogger(__name__)


@dataclass
class RoutingRequest:
    """What the pipeline knows of one request.

    Attributes:
        model: the model asked for.
        token_ids: the prompt's token ids, or None when they could not be computed.
        headers: the request's headers, lower-cased names.
        tokenize_ms: time spent tokenizing (reported apart from scheduling).
    """

    model: str
    token_ids: tuple[int, ...] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    tokenize_ms: float = 0.0
    _keys: dict[int, BlockKeys] = field(default_factory=dict, repr=False)

    def keys(self, block_size: int) -> BlockKeys:
        """Fleet's keys of the prompt's full blocks of ``block_size`` tokens (lazy, cached)."""
        keys = self._keys.get(block_size)
        if keys is None:
            keys = self._keys[block_size] = BlockKeys(self.model, self.token_ids or (), block_size)
        return keys

    @property
    def session_id(self) -> str | None:
        return self.headers.get("x-session-id") or self.headers.get("x-session-token") or None


class PromptTokenizer:
    """Tokenizes requests per model; tokenizers load lazily from the model folders.

    Args:
        model_paths: model name → model folder (``tokenizer.json``, chat template).
    """

    def __init__(self, model_paths: Mapping[str, str]) -> None:
        self.model_paths = dict(model_paths)
        self._loaded: dict[str, VllmTokenizer | None] = {}
        self._loading: dict[str, trio.Event] = {}
        self._limiter = trio.CapacityLimiter(2)

    async def tokenizer(self, model: str) -> VllmTokenizer | None:
        """The model's tokenizer, loading it on first use; None if it cannot be loaded."""
        if model in self._loaded:
            return self._loaded[model]
        pending = self._loading.get(model)
        if pending is not None:
            await pending.wait()
            return self._loaded.get(model)
        done = self._loading[model] = trio.Event()
        path = self.model_paths.get(model)
        try:
            loaded = await trio.to_thread.run_sync(self._load, model, path)
        finally:
            done.set()
            del self._loading[model]
        if self.model_paths.get(model) == path:  # else set_folder() came meanwhile: load again
            self._loaded[model] = loaded
        return loaded

    def set_folder(self, model: str, folder: str) -> None:
        """Tokenize ``model`` with the tokenizer in ``folder`` from now on (loaded on next use;
        a tokenizer loaded or found missing before is forgotten)."""
        self.model_paths[model] = folder
        self._loaded.pop(model, None)

    def _load(self, model: str, path: str | None) -> VllmTokenizer | None:
        if path is None:
            log.warning("no model folder known for %r: routing it without prefix matching", model)
            return None
        if "://" in path:  # a remote source (deploybook.py): fetched by tokenizers.py
            log.info(
                "the tokenizer of %r (%s) is not here yet: routing it without prefix matching "
                "until it is fetched",
                model,
                path,
            )
            return None
        try:
            return VllmTokenizer(Path(path))
        except (ConfigError, OSError, ValueError) as exc:
            log.warning("cannot load the tokenizer of %r (%s): no prefix matching", model, exc)
            return None

    async def tokens(
        self, model: str, kind: str, body: Mapping[str, Any]
    ) -> tuple[int, ...] | None:
        """The prompt's token ids as the engine will see them, or None.

        Long prompts are tokenized in a worker thread (a 4k-token prompt takes several ms, which
        would stall every other request on the event loop; the tokenizer lets go of the GIL
        meanwhile: ``python -m bench tokenize-stall``); short ones inline, where a thread hop
        would cost more than the work.
        """
        tokenizer = await self.tokenizer(model)
        if tokenizer is None:
            return None
        if _text_size(kind, body) < INLINE_TOKENIZE_CHARS:
            return prompt_tokens(tokenizer, kind, body)
        return await trio.to_thread.run_sync(
            prompt_tokens, tokenizer, kind, body, limiter=self._limiter
        )

    async def count(self, model: str, text: str) -> int | None:
        """How many tokens ``text`` is (no special tokens added), or None (no tokenizer);
        long text is counted in a worker thread, as :meth:`tokens` does."""
        tokenizer = await self.tokenizer(model)
        if tokenizer is None:
            return None
        if len(text) < INLINE_TOKENIZE_CHARS:
            return len(tokenizer.encode(text, add_special_tokens=False))
        ids = await trio.to_thread.run_sync(
            functools.partial(tokenizer.encode, text, add_special_tokens=False),
            limiter=self._limiter,
        )
        return len(ids)


INLINE_TOKENIZE_CHARS = 4096  # longer prompts are tokenized in a worker thread


def _text_size(kind: str, body: Mapping[str, Any]) -> int:
    """Roughly how much text there is to tokenize (characters)."""
    if kind == "chat":
        total = 0
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, str):
                total += len(content)
            elif isinstance(content, list):
                total += sum(len(str(part)) for part in content)
        return total
    prompt = body.get("prompt")
    return len(prompt) if isinstance(prompt, str) else 0


def prompt_tokens(
    tokenizer: VllmTokenizer, kind: str, body: Mapping[str, Any]
) -> tuple[int, ...] | None:
    """Tokenize a completion or chat body like vLLM 0.32; None when it cannot be done here."""
    try:
        if kind == "chat":
            text = tokenizer.render_chat(
                body.get("messages") or [],
                add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                continue_final_message=bool(body.get("continue_final_message", False)),
                tools=body.get("tools"),
                template_kwargs=body.get("chat_template_kwargs"),
            )
            add_special = bool(body.get("add_special_tokens", False))
            return tuple(tokenizer.encode(text, add_special_tokens=add_special))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
            prompt = prompt[0]
        if isinstance(prompt, str):
            add_special = bool(body.get("add_special_tokens", True))
            return tuple(tokenizer.encode(prompt, add_special_tokens=add_special))
        if isinstance(prompt, Sequence) and all(type(t) is int for t in prompt):
            return tuple(prompt)
    except (ChatTemplateError, TypeError, ValueError) as exc:
        log.debug("prompt not tokenized for routing: %s", exc)
    return None


__all__ = ["PromptTokenizer", "RoutingRequest", "prompt_tokens"]
