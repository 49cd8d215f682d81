"""Which engines may serve a request for a served name: sans-I/O.

A served name may be served by several deployments (versions of one model, a canary): each new
session goes to one of them by ``traffic_weight``, sticky per session key (``x-session-id``;
a request without one is a session of its own), among the deployments that have a routable
engine now, so a version with no ready engine never turns a request away while another could
serve it. A name no deployment serves falls back to the engines that report it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .placement import Placer
from .registry import EngineView
from .traffic import pick_version

SESSION_HEADERS = ("x-session-id", "x-session-token")  # the latter: llm-d's


def session_key(headers: Mapping[str, str], request_id: str) -> str:
    """The key a request's version is picked by: its session, else its own id."""
    for name in SESSION_HEADERS:
        value = headers.get(name)
        if value:
            return value
    return request_id


def engines_for(
    placer: Placer, routable: Sequence[EngineView], model: str, session: str | None
) -> list[EngineView]:
    """The engines a request for ``model`` may go to.

    Args:
        placer: the deployments.
        routable: every routable engine now.
        model: the served name asked for.
        session: the session key (:func:`session_key`); None: every version's engines (for
            counting capacity, not for routing).
    """
    versions = placer.serving(model)
    if not versions:
        return [e for e in routable if e.model == model]
    names = {d.name for d in versions}
    by_version: dict[str, list[EngineView]] = {}
    for engine in routable:
        owner = placer.owner(engine.id)
        if owner is not None and owner.name in names:
            by_version.setdefault(owner.name, []).append(engine)
    live = [d for d in versions if d.name in by_version]
    if session is None or len(live) <= 1:
        return [e for d in live for e in by_version[d.name]]
    picked = pick_version(live, session)
    if picked is None:  # every live version weighs 0: none preferred
        return [e for d in live for e in by_version[d.name]]
    return by_version[picked.name]


__all__ = ["SESSION_HEADERS", "engines_for", "session_key"]
