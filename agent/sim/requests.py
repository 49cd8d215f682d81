"""Parse and check OpenAI request bodies the way vLLM 0.32's server does, into frozen params.

Two layers, as in vLLM: a schema layer (:mod:`.schema`: types of each field, pydantic's lax
coercions) whose failures are :func:`~fleet.agent.sim.errors.validation_error`; then vLLM's own
checks, in vLLM's order (model,
``max_tokens`` against the context, prompt length, sampling parameters), whose failures are
:func:`~fleet.agent.sim.errors.bad_request` with vLLM's wording.

What the simulator does not simulate is refused with a 400 naming the parameter rather than
silently ignored: ``n`` other than 1, ``best_of`` > 1, more than one prompt per request,
``echo``, ``logprobs``/``top_logprobs``/``prompt_logprobs``, and structured output
(``response_format`` other than text). Unknown fields are ignored, as vLLM ignores them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fleet.protocol.vllm_tokenizer import ChatTemplateError, VllmTokenizer

from .errors import bad_request, describe_input, not_found
from .schema import Schema, check_messages, check_prompt, decode_body

RequestKind = Literal["completion", "chat"]

GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: a lower temperature is greedy sampling


@dataclass(frozen=True)
class GenerateParams:
    """A checked inference request, ready for the engine.

    Attributes:
        kind: ``completion`` or ``chat``.
        model: the model name the response reports.
        prompt_tokens: the prompt, tokenized (or as given).
        max_tokens: tokens to generate, clamped to the context like vLLM's ``get_max_tokens``.
        stream: SSE response.
        include_usage: ``stream_options.include_usage``.
        continuous_usage: ``stream_options.continuous_usage_stats``.
        stop: stop strings.
        seed: the request's ``seed``; with ``temperature == 0`` the prompt alone fixes the output.
        greedy: ``temperature == 0``.
        kv_transfer_params: the request's ``kv_transfer_params`` (P/D), or None.
    """

    kind: RequestKind
    model: str
    prompt_tokens: tuple[int, ...]
    max_tokens: int
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    stop: tuple[str, ...] = ()
    seed: int | None = None
    greedy: bool = False
    kv_transfer_params: dict[str, Any] | None = None


@dataclass(frozen=True)
class TokenizeParams:
    """A checked ``/tokenize`` request."""

    tokens: tuple[int, ...]
    return_token_strs: bool


class RequestParser:
    """Checks requests for one served model.

    Args:
        tokenizer: the model's tokenizer and chat template.
        served_model_names: names the engine answers to (the first is reported).
        max_model_len: the context length.
    """

    def __init__(
        self, tokenizer: VllmTokenizer, served_model_names: Sequence[str], max_model_len: int
    ) -> None:
        self.tokenizer = tokenizer
        self.served = tuple(served_model_names)
        self.max_model_len = max_model_len

    def check_model(self, model: str | None) -> str:
        """Return the reported model name.

        Raises:
            SimApiError: 404 for a name not served (no name means the first served one).
        """
        if model is not None and model not in self.served:
            raise not_found(model, self.served)
        return self.served[0]

    def generate(self, kind: RequestKind, body: Any, *, render: bool = False) -> GenerateParams:
        """Check a ``/v1/completions`` or ``/v1/chat/completions`` body.

        Args:
            kind: which route.
            body: the decoded JSON body.
            render: checking for a ``/render`` route, which only tokenizes: the simulator's
                own limits on what it generates (``n``, logprobs, ``echo``) do not apply.

        Raises:
            SimApiError: 400 or 404 with vLLM's body.
        """
        s = Schema(body)
        model = s.get_str("model")
        stream = s.get_bool("stream", False)
        options = s.get_dict("stream_options")
        n = s.get_int("n", 1)
        best_of = s.get_int("best_of")
        temperature = s.get_float("temperature")
        top_p = s.get_float("top_p")
        seed = s.get_int("seed")
        stop = s.stop()
        kv_transfer_params = s.get_dict("kv_transfer_params")
        max_tokens_key = "max_tokens"
        if kind == "chat":
            max_tokens = s.get_int("max_tokens")
            mct = s.get_int("max_completion_tokens")
            if mct is not None:
                max_tokens, max_tokens_key = mct, "max_completion_tokens"
            messages = s.get_list("messages")
            if "messages" not in s.body:
                s.errors.append(
                    {
                        "type": "missing",
                        "loc": "body.messages",
                        "msg": "Field required",
                        "input": describe_input(s.body),
                    }
                )
            check_messages(s, messages or [])
            template_kwargs = s.get_dict("chat_template_kwargs")
            tools = s.get_list("tools")
            add_generation_prompt = s.get_bool("add_generation_prompt", True)
            continue_final = s.get_bool("continue_final_message", False)
            add_special = s.get_bool("add_special_tokens", False)
            logprobs_on = s.get_bool("logprobs", False)
            top_logprobs = s.get_int("top_logprobs")
            prompt: Any = None
        else:
            max_tokens = s.get_int("max_tokens", 16)
            prompt = check_prompt(s)
            add_special = s.get_bool("add_special_tokens", True)
            logprobs_on = s.get_int("logprobs") is not None
            top_logprobs = None
            echo = s.get_bool("echo", False)
        s.done()

        if options and not stream:  # vLLM: a truthy stream_options needs stream=True
            raise bad_request(
                "Stream options can only be defined when `stream=True`.", param="stream_options"
            )
        include_usage = bool(options and options.get("include_usage"))
        continuous = bool(options and options.get("continuous_usage_stats"))
        reported = self.check_model(model)
        if n is not None and n < 1:
            raise bad_request(f"n must be at least 1, got {n}.")
        if render:
            if temperature is not None and temperature < GREEDY_EPS and n not in (None, 1):
                raise bad_request(f"n must be 1 when using greedy sampling, got {n}.")
        elif n not in (None, 1):
            raise bad_request("the Fleet simulator serves n=1 only", param="n", value=n)
        if best_of not in (None, 1):
            raise bad_request("the Fleet simulator serves best_of=1 only", param="best_of")
        if (logprobs_on or top_logprobs) and not render:
            raise bad_request("the Fleet simulator does not return logprobs", param="logprobs")
        if s.body.get("prompt_logprobs") is not None and not render:
            raise bad_request(
                "the Fleet simulator does not return logprobs", param="prompt_logprobs"
            )
        fmt = s.body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
            raise bad_request(
                "the Fleet simulator does not do structured output", param="response_format"
            )
        if max_tokens is not None and max_tokens > self.max_model_len:
            raise bad_request(
                f"{max_tokens_key}={max_tokens} cannot be greater than "
                f"max_model_len={self.max_model_len}. Please request fewer output tokens.",
                param=max_tokens_key,
                value=max_tokens,
            )

        if kind == "chat":
            try:
                text = self.tokenizer.render_chat(
                    messages or [],
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final,
                    tools=tools,
                    template_kwargs=template_kwargs,
                )
            except ChatTemplateError as exc:
                raise bad_request(str(exc)) from exc
            tokens = self.tokenizer.encode(text, add_special_tokens=add_special)
            tokens = self._check_length(tokens, truncated=True)
        else:
            if echo and not render:
                raise bad_request("the Fleet simulator does not echo prompts", param="echo")
            tokens = self._prompt_tokens(prompt, add_special)

        limit = self.max_model_len - len(tokens)
        effective = limit if max_tokens is None else min(max_tokens, limit)
        if effective < 1:
            raise bad_request(
                f"max_tokens must be at least 1, got {effective}.",
                param="max_tokens",
                value=effective,
            )
        if temperature is not None:
            if not math.isfinite(temperature):
                raise bad_request(
                    f"temperature must be a finite number, got {temperature}.",
                    param="temperature",
                    value=temperature,
                )
            if temperature < 0:
                raise bad_request(
                    f"temperature must be non-negative, got {temperature}.",
                    param="temperature",
                    value=temperature,
                )
        if top_p is not None and not 0 < top_p <= 1:
            raise bad_request(f"top_p must be in (0, 1], got {top_p}.", param="top_p", value=top_p)
        return GenerateParams(
            kind=kind,
            model=reported,
            prompt_tokens=tuple(tokens),
            max_tokens=effective,
            stream=stream,
            include_usage=include_usage,
            continuous_usage=continuous,
            stop=stop,
            seed=seed,
            greedy=temperature == 0,
            kv_transfer_params=kv_transfer_params,
        )

    def render(self, kind: RequestKind, body: Any) -> list[GenerateParams]:
        """Check a ``/v1/completions/render`` or ``/v1/chat/completions/render`` body.

        A completion body with several prompts gives one entry per prompt, as vLLM's does.

        Raises:
            SimApiError: 400 or 404 with vLLM's body.
        """
        prompt = body.get("prompt") if kind == "completion" and isinstance(body, dict) else None
        if isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int):
            return [self.generate(kind, {**body, "prompt": [p]}, render=True) for p in prompt]
        return [self.generate(kind, body, render=True)]

    def tokenize(self, body: Any) -> TokenizeParams:
        """Check a ``/tokenize`` body (``prompt`` or ``messages``) and tokenize it.

        Raises:
            SimApiError: 400 or 404 with vLLM's body.
        """
        s = Schema(body)
        model = s.get_str("model")
        return_strs = s.get_bool("return_token_strs", False)
        if "prompt" not in s.body and "messages" not in s.body:
            for key in ("prompt", "messages"):
                s.errors.append(
                    {
                        "type": "missing",
                        "loc": f"body.{key}",
                        "msg": "Field required",
                        "input": describe_input(s.body),
                    }
                )
        chat = "messages" in s.body
        if chat:
            messages = s.get_list("messages") or []
            check_messages(s, messages)
            add_special = s.get_bool("add_special_tokens", False)
            add_generation_prompt = s.get_bool("add_generation_prompt", True)
            continue_final = s.get_bool("continue_final_message", False)
            template_kwargs = s.get_dict("chat_template_kwargs")
            tools = s.get_list("tools")
        else:
            prompt = s.get_str("prompt")
            add_special = s.get_bool("add_special_tokens", True)
        s.done()
        self.check_model(model)
        if chat:
            try:
                text = self.tokenizer.render_chat(
                    messages,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final,
                    tools=tools,
                    template_kwargs=template_kwargs,
                )
            except ChatTemplateError as exc:
                raise bad_request(str(exc)) from exc
        else:
            text = prompt or ""
        tokens = self.tokenizer.encode(text, add_special_tokens=add_special)
        return TokenizeParams(tuple(tokens), return_strs)

    def detokenize(self, body: Any) -> list[int]:
        """Check a ``/detokenize`` body; return its token ids.

        Raises:
            SimApiError: 400 or 404 with vLLM's body.
        """
        s = Schema(body)
        model = s.get_str("model")
        tokens = s.get_list("tokens")
        if "tokens" not in s.body:
            s.errors.append(
                {
                    "type": "missing",
                    "loc": "body.tokens",
                    "msg": "Field required",
                    "input": describe_input(s.body),
                }
            )
        for i, token in enumerate(tokens or []):
            if type(token) is not int:
                s.error("int_type", f"tokens.{i}", "Input should be a valid integer", token)
        s.done()
        self.check_model(model)
        return list(tokens or [])

    def _prompt_tokens(self, prompt: Any, add_special: bool) -> list[int]:
        if prompt is None or prompt == []:
            raise bad_request(
                "Either prompt or prompt_embeds must be provided and non-empty.", param="prompt"
            )
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise bad_request(
                    "the Fleet simulator serves one prompt per request", param="prompt"
                )
            prompt = prompt[0]
        if isinstance(prompt, str):
            tokens = self.tokenizer.encode(prompt, add_special_tokens=add_special)
            return self._check_length(tokens, truncated=True)
        ids = list(prompt)
        vocab = self.tokenizer.vocab_size
        for token in ids:
            if not 0 <= token < vocab:
                raise bad_request(f"Token id {token} is out of vocabulary", param="prompt")
        return self._check_length(ids, truncated=False)

    def _check_length(self, tokens: list[int], *, truncated: bool) -> list[int]:
        if not tokens:
            raise bad_request("The decoder prompt cannot be empty")
        limit = self.max_model_len
        if len(tokens) > limit:
            # vLLM tokenizes text with max_length = limit + 1, so it reports "at least".
            count = limit + 1 if truncated else len(tokens)
            qualifier = "at least " if count == limit + 1 else ""
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"contains {qualifier}{count} input tokens, which exceeds this limit even "
                "without any output tokens. Please reduce the length of the input prompt.",
                param="input_tokens",
                value=count,
            )
        return tokens


__all__ = ["GenerateParams", "RequestKind", "RequestParser", "TokenizeParams", "decode_body"]
