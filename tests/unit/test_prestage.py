"""``/admin/v1/prestage``'s sans-I/O parts: the request, each node's status, the book."""

from __future__ import annotations

from typing import Any

import pytest

from fleet.coordinator.errors import ApiError
from fleet.coordinator.prestage import PrestageBook, PrestageRequest, node_status, parse_request
from fleet.coordinator.registry import NodeRecord
from fleet.protocol.messages import CachedModelInfo, FetchInfo

URI = "http://127.0.0.1:9/demo/"
SOURCES = {"chat": URI, "local": "/models/chat"}


def parse(doc: dict[str, Any], live: tuple[str, ...] = ("a", "b")) -> PrestageRequest:
    return parse_request(doc, deployment_source=SOURCES.get, live_nodes=live, now=5.0)


def test_a_deployment_or_a_source_goes_to_every_live_node_by_default() -> None:
    assert parse({"deployment": "chat"}) == PrestageRequest(URI, "chat", ("a", "b"), 5.0)
    assert parse({"source": "hf://o/m@abc", "nodes": ["b", "b"]}) == PrestageRequest(
        "hf://o/m@abc", "", ("b",), 5.0
    )


@pytest.mark.parametrize(
    ("doc", "status", "param", "text"),
    [
        ({}, 400, "deployment", "one of"),
        ({"deployment": "chat", "source": URI}, 400, "deployment", "one of"),
        ({"deployment": "nope"}, 404, "deployment", "No deployment named `nope`"),
        ({"deployment": "local"}, 400, "deployment", "nothing to fetch"),
        ({"source": "/models/chat"}, 400, "source", "nothing to fetch"),
        ({"source": "file:///models/chat"}, 400, "source", "nothing to fetch"),
        ({"source": "ftp://x/y"}, 400, "source", "not a model source"),
        ({"source": 3}, 400, "source", "non-empty string"),
        ({"source": URI, "nodes": ["c"]}, 404, "nodes", "No live node `c`"),
        ({"source": URI, "nodes": []}, 400, "nodes", "non-empty list"),
        ({"source": URI, "nodes": "a"}, 400, "nodes", "non-empty list"),
        ({"source": URI, "node": ["a"]}, 400, "node", "Unknown field"),
    ],
)
def test_bad_requests_name_the_field(
    doc: dict[str, Any], status: int, param: str, text: str
) -> None:
    with pytest.raises(ApiError) as info:
        parse(doc)
    assert (info.value.status, info.value.param) == (status, param)
    assert text in info.value.message


def test_no_live_node_is_an_error() -> None:
    with pytest.raises(ApiError, match="No live node") as info:
        parse({"source": URI}, live=())
    assert info.value.param == "nodes"


def _node(**kw: Any) -> NodeRecord:
    return NodeRecord("a", "http://a", "0", registered_at=0.0, last_seen=0.0, **kw)


def test_node_status_follows_the_store_reports() -> None:
    assert node_status("x", None, URI) == {"node": "x", "state": "unknown"}
    assert node_status("a", _node(lost=True), URI)["state"] == "lost"
    assert node_status("a", _node(), URI) == {"node": "a", "state": "requested"}
    fetching = _node(fetches=(FetchInfo(URI, "downloading", 5, 20, rate_bps=2.04, eta_s=7.46),))
    assert node_status("a", fetching, URI) == {
        "node": "a", "state": "fetching", "phase": "downloading", "bytesDone": 5,
        "bytesTotal": 20, "rateBps": 2.0, "etaS": 7.5,
    }  # fmt: skip
    failed = _node(fetches=(FetchInfo(URI, "failed", error="not_found: 404"),))
    assert node_status("a", failed, URI) == {"node": "a", "state": "failed",
                                              "error": "not_found: 404"}  # fmt: skip
    cached = _node(models=(CachedModelInfo(URI, 20),), fetches=failed.fetches)
    assert node_status("a", cached, URI) == {"node": "a", "state": "cached", "sizeBytes": 20,
                                              "pinned": False}  # fmt: skip


def test_the_book_merges_nodes_per_source() -> None:
    book = PrestageBook()
    book.add(PrestageRequest(URI, "chat", ("a",), 1.0))
    book.add(PrestageRequest(URI, "", ("b", "a"), 2.0))
    assert book.requests() == [PrestageRequest(URI, "chat", ("a", "b"), 2.0)]
