"""llm-d plugin types whose job Fleet does another way: accepted, not run, logged once.

An llm-d config names these for tokenizing, endpoint discovery, metrics collection and the
routing sidecar's headers; Fleet does each of those jobs itself, so a config that names them
loads unchanged and the loader logs, once per plugin, what Fleet does instead. Their
parameters must be a mapping and are not read. A profile may list one (llm-d's older samples
put ``tokenizer`` in the profile); it is skipped there.

Each type's source in llm-d-inference-scheduler (``pkg/epp/framework/plugins/``, registered in
``register.go``, or in gateway-api-inference-extension's data layer, vendored there):
``requestcontrol/dataproducer/tokenizer/tokenizer.go`` (``token-producer``, legacy
``tokenizer``), ``datalayer/source/notifications/`` (``endpoint-notification-source``,
``k8s-notification-source``), ``datalayer/source/metrics/datasource.go``
(``metrics-data-source``), ``datalayer/extractor/metrics/factories.go``
(``core-metrics-extractor``), ``datalayer/source/models/`` and ``datalayer/extractor/models/``
(``models-data-source``, ``models-data-extractor``),
``requestcontrol/dataproducer/approximateprefix/plugin.go`` (``approx-prefix-cache-producer``),
``requestcontrol/dataproducer/inflightload/producer.go`` (``inflight-load-producer``),
``scheduling/profilehandler/disagg/disagg_headers_handler.go`` (``disagg-headers-handler``,
legacy ``prefill-header-handler``), ``flowcontrol/saturationdetector/``
(``utilization-detector``, ``concurrency-detector``), ``flowcontrol/fairness/roundrobin/`` and
``flowcontrol/ordering/fcfs/`` (``round-robin-fairness-policy``, ``fcfs-ordering-policy``),
``requesthandling/parsers/openai/`` (``openai-parser``).
"""

from __future__ import annotations

from typing import ClassVar, cast

from .plugins import Params, Plugin

TOKENIZE = (
    "the coordinator tokenizes each prompt itself with the model's own tokenizer and chat "
    "template (coordinator/tokenizers.py)"
)
DISCOVERY = "engines register with the coordinator through their node's agent"
METRICS = "the coordinator scrapes every engine's /metrics itself (router/enginestats.py)"
MODELS = "engines report the model they serve when they register"
PREFIX = "prefix matches come from Fleet's KV index, built from the engines' KV events"
INFLIGHT = "the coordinator counts each engine's in-flight requests itself"
HEADERS = (
    "Fleet does the routing sidecar's job itself: the decision names the prefill engine and "
    "the coordinator sends the split (until it does, issue 17, requests go to the decode "
    "engine only)"
)
SATURATION = (
    "admission control caps each model's requests in flight (--engine-slots per engine) and "
    "queues or sheds the rest (--max-queue, coordinator/admission.py)"
)
FLOW = (
    "admission control queues waiting requests by x-priority, first come first served within "
    "a priority (coordinator/admission.py)"
)
PARSER = "the coordinator parses and validates OpenAI requests itself"

ELSEWHERE: dict[str, str] = {
    "token-producer": TOKENIZE,
    "tokenizer": TOKENIZE,
    "endpoint-notification-source": DISCOVERY,
    "k8s-notification-source": DISCOVERY,
    "metrics-data-source": METRICS,
    "core-metrics-extractor": METRICS,
    "models-data-source": MODELS,
    "models-data-extractor": MODELS,
    "approx-prefix-cache-producer": PREFIX,
    "inflight-load-producer": INFLIGHT,
    "disagg-headers-handler": HEADERS,
    "prefill-header-handler": HEADERS,
    "utilization-detector": SATURATION,
    "concurrency-detector": SATURATION,
    "openai-parser": PARSER,
    "round-robin-fairness-policy": FLOW,
    "fcfs-ordering-policy": FLOW,
}


class HandledElsewhere(Plugin):
    """A plugin Fleet accepts and does not run; :attr:`notes` says what Fleet does instead."""

    KIND = "elsewhere"
    INSTEAD: ClassVar[str] = ""
    ANY_PARAMS: ClassVar[bool] = True  # its parameters are not read: any keys

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.notes.append(f"plugins[{name}] ({self.TYPE}): not run; {self.INSTEAD}")


TYPES: tuple[type[HandledElsewhere], ...] = tuple(
    cast(
        "type[HandledElsewhere]",
        type(f"Elsewhere[{t}]", (HandledElsewhere,), {"TYPE": t, "INSTEAD": why}),
    )
    for t, why in ELSEWHERE.items()
)

__all__ = ["ELSEWHERE", "TYPES", "HandledElsewhere"]
