"""What an attempt can come to (outcomes) and what to do next (steps): the vocabulary of
:mod:`.attempts`' planner and the I/O that follows it. Frozen, slotted, small.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ApiError
from .registry import EngineView
from .router.scheduler import Decision

# -- outcomes: what happened to a try ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """The engine's response started (below 500; for a resume, a stream)."""


@dataclass(frozen=True, slots=True)
class Refused:
    """The engine refused the connection: nothing listens, its process or node is gone."""

    detail: str = ""


@dataclass(frozen=True, slots=True)
class Failed:
    """The try failed.

    Attributes:
        reason: why, as ``fleet_retries_total`` labels it (``5xx``, ``connect``, ``timeout``,
            ``down``, ...).
        detail: what happened, for the client's message.
        status: the engine's status when it answered (its answer can go to the client).
        retryable: False when the engine's answer is final (a continuation it refused).
    """

    reason: str
    detail: str = ""
    status: int | None = None
    retryable: bool = True


@dataclass(frozen=True, slots=True)
class PastDeadline:
    """The request's deadline passed while the try waited for the response to start."""


@dataclass(frozen=True, slots=True)
class Broken:
    """A connected stream broke (an error, its end without ``[DONE]``, silence)."""

    why: str = ""


CONNECTED = Connected()
PAST_DEADLINE = PastDeadline()
Outcome = Connected | Refused | Failed | PastDeadline | Broken

# -- steps: what to do next --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Try:
    """Open the request on ``decision.engine``. ``retry``: why the try before failed (a retry's
    ``fleet_retries_total`` reason); empty for a first try and for continuations."""

    decision: Decision
    retry: str = ""

    @property
    def engine(self) -> EngineView:
        assert self.decision.engine is not None
        return self.decision.engine


@dataclass(frozen=True, slots=True)
class Wait:
    """Sleep ``seconds`` (a retry's backoff), then ask again."""

    seconds: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop trying. ``error``: what the client gets; None: the last engine's own answer (a
    5xx) goes to it. ``why``: ``deadline``, ``budget`` (the retry budget was spent),
    ``attempts``, ``no_engine``, ``filtered``, ``exhausted`` (resumes) or ``refused``."""

    error: ApiError | None
    why: str


Step = Try | Wait | GiveUp


__all__ = [
    "CONNECTED",
    "PAST_DEADLINE",
    "Broken",
    "Connected",
    "Failed",
    "GiveUp",
    "Outcome",
    "PastDeadline",
    "Refused",
    "Step",
    "Try",
    "Wait",
]
