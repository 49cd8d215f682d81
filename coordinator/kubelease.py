"""Holding a Kubernetes Lease from trio: the API calls of :mod:`.leaselock`'s decisions.

The official ``kubernetes`` client is synchronous: each read and write runs in a worker thread.
:class:`LeaseApi` maps the Lease to and from :class:`~.leaselock.Lease` (a write carries the
read's ``resourceVersion``; the API server answers 409 when another wrote in between), and
:func:`hold_lease` runs the retry loop, telling :class:`~.leadership.Leadership` whether this
coordinator leads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import trio

from .leadership import Change, Leadership
from .leaselock import Lease, LeaseElector, Write

log = logging.getLogger(__name__)


def api_client(url: str | None) -> Any:
    """A ``kubernetes`` ApiClient: for ``url`` (tests, ``kubectl proxy``), else in-cluster
    configuration, else the kubeconfig."""
    from kubernetes import client, config

    if url:
        configuration = client.Configuration()
        configuration.host = url.rstrip("/")
        return client.ApiClient(configuration)
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


class LeaseApi:
    """Read and write one Lease (``namespace``/``name``) through the ``kubernetes`` client."""

    def __init__(self, api_client: Any, namespace: str, name: str) -> None:
        from kubernetes import client

        self.api = client.CoordinationV1Api(api_client)
        self.namespace = namespace
        self.name = name

    def read(self) -> Lease | None:
        """The Lease (None: there is none).

        Raises:
            kubernetes.client.ApiException: any answer but 200 or 404.
        """
        from kubernetes import client
        from kubernetes.client import ApiException

        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        spec = lease.spec or client.V1LeaseSpec()
        meta = lease.metadata or client.V1ObjectMeta()
        return Lease(
            holder=spec.holder_identity or "",
            duration_s=spec.lease_duration_seconds or 0,
            transitions=spec.lease_transitions or 0,
            renewed=str(spec.renew_time or ""),
            resource_version=meta.resource_version or "",
        )

    def write(self, write: Write) -> bool:
        """Create or replace the Lease; False on a conflict (409), a vanished Lease (404) or
        an existing one on create (409)."""
        from kubernetes import client
        from kubernetes.client import ApiException

        now = datetime.now(UTC)
        lease = write.lease
        body = client.V1Lease(
            metadata=client.V1ObjectMeta(
                name=self.name,
                namespace=self.namespace,
                resource_version=lease.resource_version or None,
            ),
            spec=client.V1LeaseSpec(
                holder_identity=lease.holder or None,
                lease_duration_seconds=lease.duration_s,
                lease_transitions=lease.transitions,
                renew_time=now if lease.holder else None,
                acquire_time=now if (write.create or write.takeover) else None,
            ),
        )
        try:
            if write.create:
                self.api.create_namespaced_lease(self.namespace, body)
            else:
                self.api.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True


async def hold_lease(
    api: LeaseApi,
    elector: LeaseElector,
    leadership: Leadership,
    *,
    retry_s: float,
    on_change: Callable[[Change], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Every ``retry_s``: read the Lease, write what ``elector`` decides, and tell
    ``leadership`` whether this coordinator leads. An API that cannot be reached counts as a
    failed write (a leader steps down at its renew deadline). On cancellation the Lease is
    handed back, so a successor need not wait out its duration."""
    task_status.started()
    try:
        while True:
            try:
                current = await trio.to_thread.run_sync(api.read)
                write = elector.step(current, trio.current_time(), stamp="")
                if write is not None:
                    ok = await trio.to_thread.run_sync(api.write, write)
                    elector.wrote(write, ok, trio.current_time())
            except Exception as exc:  # the API unreachable or failing: no renew this time
                log.warning("lease %s/%s: %s", api.namespace, api.name, exc)
            now = trio.current_time()
            change = leadership.observe(elector.leader(now), now)
            if change is not None:
                log.warning("%s %s the leader (lease %s/%s)", elector.identity,
                            "is now" if change.leader else "is no longer",
                            api.namespace, api.name)  # fmt: skip
                if on_change is not None:
                    on_change(change)
            await trio.sleep(retry_s)
    finally:
        leadership.observe(False, trio.current_time())
        with trio.CancelScope(shield=True), trio.move_on_after(2.0):
            await trio.to_thread.run_sync(_release, api, elector, abandon_on_cancel=True)


def _release(api: LeaseApi, elector: LeaseElector) -> None:
    try:
        current = api.read()
        if current is not None and (write := elector.release(current)) is not None:
            api.write(write)
    except Exception as exc:  # best effort: the lease lapses by itself otherwise
        log.warning("lease %s/%s not handed back: %s", api.namespace, api.name, exc)


__all__ = ["LeaseApi", "api_client", "hold_lease"]
