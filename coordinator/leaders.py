"""Which leader election a coordinator takes part in, from its settings: none (the only
coordinator leads), a lock file (several on one machine) or a Kubernetes Lease (a cluster)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .config import CoordinatorConfig
from .kubelease import LeaseApi, api_client, hold_lease
from .leadership import Change, FileLock, Leadership, hold_file_lock
from .leaselock import LeaseElector


def election(
    cfg: CoordinatorConfig, leadership: Leadership, on_change: Callable[[Change], None]
) -> Callable[..., Awaitable[Any]] | None:
    """The task that keeps ``leadership`` up to date (start it with ``nursery.start``), or
    None when this is the only coordinator. The Kubernetes client is built here, at once."""
    if cfg.leader_lock is not None:
        lock = FileLock(Path(cfg.leader_lock), cfg.coordinator_id)
        return functools.partial(
            hold_file_lock, lock, leadership, retry_s=cfg.leader_retry_s, on_change=on_change
        )
    if cfg.leader_lease is not None:
        namespace, name = cfg.lease_ref
        api = LeaseApi(api_client(cfg.kube_api), namespace, name)
        elector = LeaseElector(cfg.coordinator_id, lease_duration_s=cfg.lease_duration_s,
                               renew_deadline_s=cfg.lease_renew_deadline_s)  # fmt: skip
        return functools.partial(
            hold_lease, api, elector, leadership, retry_s=cfg.leader_retry_s, on_change=on_change
        )
    return None


__all__ = ["election"]
