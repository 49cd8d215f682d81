"""What the HTTP layer (:mod:`.api`, :mod:`.adminapi`, :mod:`.prestage`) uses of the
coordinator: narrow, structural ports, so none of them imports :mod:`.service`.

:class:`~.service.Coordinator` satisfies both (checked by mypy where it hands itself over);
the inference routes take still less (:class:`.fastroutes.InferencePorts`), the route API its
own (:class:`.routeapi.RoutingPorts`).
"""

from __future__ import annotations

from typing import Protocol

from .config import CoordinatorConfig
from .deploybook import DeploymentBook
from .fastroutes import InferencePorts
from .kvindex import KVIndex
from .leadership import Leadership
from .link import AgentLink
from .metrics import CoordinatorMetrics
from .placement import Placer
from .prestage import PrestageBook, PrestagePorts
from .registry import EngineView, FleetRegistry
from .router.prompt import PromptTokenizer
from .router.scheduler import Scheduler
from .tpgroups import TPGroups


class AdminPorts(PrestagePorts, Protocol):
    """The deployments API (``/admin/v1/...``) and model pre-staging."""

    cfg: CoordinatorConfig
    book: DeploymentBook
    placer: Placer
    registry: FleetRegistry
    groups: TPGroups
    prestages: PrestageBook
    link: AgentLink
    deployment_notes: dict[str, list[str]]

    def apply_declared(self) -> None:
        """Place what the deployment book declares now."""
        ...

    async def reload_folder(self) -> bool:
        """Read the deployments folder again; whether it changed."""
        ...


class ApiPorts(AdminPorts, Protocol):
    """Everything the quart app serves: the admin routes, state, metrics, the KV index and
    routing APIs, and the inference routes of a connection hypercorn serves."""

    started_at: float
    metrics: CoordinatorMetrics
    leadership: Leadership
    kvindex: KVIndex
    scheduler: Scheduler
    prompt_tokenizer: PromptTokenizer
    inference_ports: InferencePorts

    def engines_for(self, model: str, session: str | None) -> list[EngineView]:
        """The routable engines a request for ``model`` may go to."""
        ...

    def served_models(self) -> list[str]:
        """Every served name with a routable engine."""
        ...

    def refresh_gauges(self) -> None:
        """Update the gauges that mirror registry state."""
        ...


__all__ = ["AdminPorts", "ApiPorts"]
