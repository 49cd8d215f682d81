"""FleetModel custom resources through the Kubernetes API: watch them, write their status.

Every coordinator lists and watches the FleetModels of its namespace (so each routes by the same
deployments); the leader alone writes: each object's ``status`` when it changes, an Event when
its Ready condition turns, and a finalizer (``fleet.dev/drain``) so that deleting a FleetModel
first drains and stops its engines, then lets the object go. What to write is decided in
:mod:`.fleetmodelcr`; the official ``kubernetes`` client is synchronous, so each call runs in a
worker thread.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import trio

from .fleetmodelcr import Obj, ResourceCache, resource_status

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "fleet.dev", "v1alpha1", "fleetmodels"
FINALIZER = "fleet.dev/drain"
REQUEST_TIMEOUT_S = 10.0  # each API call but the watch


def stamp() -> str:
    """Now, as the API server writes times (RFC 3339, seconds, UTC)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FleetModelApi:
    """The FleetModels of one namespace (and Events about them) through the ``kubernetes``
    client; every method blocks (run it in a thread)."""

    def __init__(self, api_client: Any, namespace: str, component: str) -> None:
        from kubernetes import client

        self.objects = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.component = component  # who reports Events (the coordinator id)
        self.where = (GROUP, VERSION, namespace, PLURAL)

    def list_all(self) -> tuple[list[Obj], str]:
        """Every FleetModel, and the list's resourceVersion to watch from."""
        found: Obj = self.objects.list_namespaced_custom_object(  # type: ignore[assignment]
            *self.where, _request_timeout=REQUEST_TIMEOUT_S
        )
        return list(found.get("items") or []), str(found["metadata"]["resourceVersion"])

    def watch(self, since: str, timeout_s: int, deliver: Callable[[str, Obj], None]) -> str | None:
        """Watch from ``since`` for up to ``timeout_s``, handing each event to ``deliver``; the
        resourceVersion to go on from, or None when the server says to list again (410 Gone,
        an ERROR event)."""
        from kubernetes import watch

        w: Any = watch.Watch()  # type: ignore[no-untyped-call]
        for event in w.stream(
            self.objects.list_namespaced_custom_object,
            *self.where,
            resource_version=since,
            timeout_seconds=timeout_s,
            _request_timeout=timeout_s + REQUEST_TIMEOUT_S,
        ):
            if event["type"] == "ERROR":
                log.warning("FleetModel watch: %s", event.get("raw_object"))
                return None
            deliver(event["type"], event["raw_object"])
        return str(w.resource_version or since)

    def write_status(self, name: str, status: Obj) -> bool:
        """Merge ``status`` into the object's status; False when the object is gone."""
        from kubernetes.client import ApiException

        try:
            self.objects.patch_namespaced_custom_object_status(
                *self.where, name, {"status": status}, _request_timeout=REQUEST_TIMEOUT_S
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def set_finalizers(self, obj: Obj, finalizers: list[str]) -> bool:
        """Replace the object's finalizers, if it is still the version read (else False)."""
        from kubernetes.client import ApiException

        meta = obj["metadata"]
        body = {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}}
        try:
            self.objects.patch_namespaced_custom_object(
                *self.where, meta["name"], body, _request_timeout=REQUEST_TIMEOUT_S
            )
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    def event(self, obj: Obj, kind: str, reason: str, message: str) -> None:
        """Record an Event (``kind``: Normal or Warning) about a FleetModel."""
        from kubernetes import client

        meta = obj["metadata"]
        now = datetime.now(UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                name=f"{meta['name']}.{secrets.token_hex(8)}", namespace=self.namespace
            ),
            involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind="FleetModel",
                name=meta["name"],
                namespace=self.namespace,
                uid=meta.get("uid"),
                resource_version=meta.get("resourceVersion"),
            ),
            reason=reason,
            message=message[:1024],
            type=kind,
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=client.V1EventSource(component=self.component),
            reporting_component="fleet.dev/coordinator",
            reporting_instance=self.component,
        )
        self.core.create_namespaced_event(self.namespace, body, _request_timeout=REQUEST_TIMEOUT_S)


async def watch_resources(
    api: FleetModelApi,
    cache: ResourceCache,
    on_change: Callable[[], None],
    *,
    watch_timeout_s: int = 60,
    retry_s: float = 2.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """List, then watch, the FleetModels into ``cache`` forever, calling ``on_change`` when the
    declared set changed (a spec, a new or deleted object). Started once the first list is in
    (an API that cannot be reached then is retried, logged each time)."""
    started = False

    def deliver(kind: str, obj: Obj) -> None:
        if cache.apply(kind, obj):
            on_change()

    def deliver_from_thread(kind: str, obj: Obj) -> None:
        trio.from_thread.run_sync(deliver, kind, obj)

    while True:
        try:
            items, listed = await trio.to_thread.run_sync(api.list_all)
            since: str | None = listed
            cache.replace(items)
            on_change()
            if not started:
                started = True
                task_status.started()
            while since is not None:
                since = await trio.to_thread.run_sync(
                    api.watch, since, watch_timeout_s, deliver_from_thread, abandon_on_cancel=True
                )
        except trio.Cancelled:
            raise
        except Exception as exc:  # the API unreachable or failing: list again after a pause
            log.warning("FleetModels of namespace %s: %s", api.namespace, exc)
            await trio.sleep(retry_s)


@dataclass
class StatusWriter:
    """What the leader last wrote, so an unchanged status is not written again."""

    api: FleetModelApi
    written: dict[str, Obj] = field(default_factory=dict)  # name -> status

    def forget(self) -> None:
        """Write everything again (this coordinator just became the leader)."""
        self.written.clear()

    async def write(
        self,
        cache: ResourceCache,
        rows: Mapping[str, Mapping[str, Any]],
        problems: Mapping[str, str],
        running: Iterable[str],
    ) -> int:
        """Bring every FleetModel's status, finalizer and Events up to date; the number of
        writes made. ``rows``: :func:`.deploybook.status` rows by deployment name;
        ``problems``: why a FleetModel is not run; ``running``: engine ids live nodes run."""
        writes = 0
        names_running = {engine_id.rsplit("-", 1)[0] for engine_id in running}
        for name, obj in sorted(cache.objects.items()):
            meta = obj["metadata"]
            finalizers = list(meta.get("finalizers") or [])
            try:
                if meta.get("deletionTimestamp"):
                    if FINALIZER in finalizers and name not in names_running:
                        finalizers.remove(FINALIZER)  # every engine stopped: let it go
                        writes += await trio.to_thread.run_sync(
                            self.api.set_finalizers, obj, finalizers
                        )
                        log.info("FleetModel %s deleted: its engines stopped", name)
                    continue
                if FINALIZER not in finalizers:
                    writes += await trio.to_thread.run_sync(
                        self.api.set_finalizers, obj, [*finalizers, FINALIZER]
                    )
                    continue  # the MODIFIED event brings the new resourceVersion
                writes += await self._status(obj, rows.get(name), problems.get(name, ""))
            except Exception as exc:  # one object's failure stops none of the others
                log.warning("FleetModel %s: status not written: %s", name, exc)
        return writes

    async def _status(self, obj: Obj, row: Mapping[str, Any] | None, problem: str) -> int:
        meta = obj["metadata"]
        name = meta["name"]
        current = obj.get("status") or {}
        if row is None and not problem:
            problem = "not run by Fleet"
        new = resource_status(row, int(meta.get("generation") or 0), current, stamp(), problem)
        if new == current or new == self.written.get(name):
            return 0
        if not await trio.to_thread.run_sync(self.api.write_status, name, new):
            return 0
        self.written[name] = new
        was = {c["type"]: c["status"] for c in current.get("conditions") or []}
        ready = next(c for c in new["conditions"] if c["type"] == "Ready")
        if was.get("Ready") != ready["status"]:
            kind = "Normal" if ready["status"] == "True" else "Warning"
            await trio.to_thread.run_sync(
                self.api.event, obj, kind, ready["reason"], ready["message"]
            )
        return 1


__all__ = ["FINALIZER", "FleetModelApi", "StatusWriter", "stamp", "watch_resources"]
