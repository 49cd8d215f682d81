"""kmock's Kubernetes emulator with the API conventions that Fleet's tests rely on.

kmock 0.8 answers PUT with 404, keeps no resourceVersion/uid/creationTimestamp, never
answers 409, ignores selectors and a watch's resourceVersion/timeoutSeconds, merges
whole bodies into /status, answers 200 to a create and 404 to an empty list
(shared/TEST-SERVERS.md). This subclass serves every resource request (core and
custom resources alike) from its own store and leaves only discovery (/api, /apis,
/version) to kmock. It relies on kmock's private `kmock._internal.rendering.Request`
(the parsed request handed to `_handle`, and its `_raw_request`) and on the
`_handle` hook of `kmock._internal.apps.RawHandler`: kmock is pinned to 0.8.

The `/scale` subresource of a custom resource whose CRD declares `subresources.scale`
follows apiextensions-apiserver's `ScaleREST` (pkg/registry/customresource/etcd.go): GET
answers an `autoscaling/v1` Scale built from the parent (spec.replicas at specReplicasPath,
500 when absent; status.replicas at statusReplicasPath, 0 when absent; status.selector at
labelSelectorPath, "" when absent); PUT and merge PATCH write spec.replicas back to the
parent (a new resourceVersion and generation, a MODIFIED event), 409 on a stale
resourceVersion, 422 on a negative replicas (validator.go's ValidateScaleSpec, also checked
on every write of the parent) or a PATCH that makes replicas a non-int32 (patch.go), 400 on
such a PUT body or one naming another object or kind.

Not emulated: /scale of built-in resources (apps/v1 Deployments...) and other
subresources (404), JSON patch (415), strategic-merge list semantics (a dict patch is an
RFC 7386 merge), set-based selectors (400), deletecollection, admission, schema
validation, managedFields, namespace existence, 410 Gone.
"""

import asyncio
import bisect
import contextlib
import copy
import datetime
import json
import secrets
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp.web
import attrs
import kmock

from .scale import CRDS, Key, ScaleSubresource
from .wire import ApiError, Obj, merge_patch, status_body

# Built-in resources without a /status subresource: writes to them change status too.
NO_STATUS = {"leases", "configmaps", "secrets", "events", "serviceaccounts", "endpoints"}
MAX_WATCH_S = 1800.0  # a real server ends a watch after 30-60 min


def parse_selector(text: str, fields: bool) -> list[tuple[str, str, str | None]]:
    """`a=b`, `a==b`, `a!=b`, `a`, `!a` -> [(key, op, value)]; set-based ones are 400."""
    if "(" in text or " in " in text or " notin " in text:
        raise ApiError(400, "BadRequest", f"set-based selectors are not emulated: {text!r}")
    terms = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        for op in ("!=", "==", "="):
            if op in term:
                key, value = (s.strip() for s in term.split(op, 1))
                terms.append((key, "!=" if op == "!=" else "=", value))
                break
        else:
            if fields:
                raise ApiError(400, "BadRequest", f"invalid field selector: {term!r}")
            terms.append((term[1:], "!", None) if term.startswith("!") else (term, "?", None))
    for key, _, _ in terms if fields else ():
        if key not in ("metadata.name", "metadata.namespace"):
            raise ApiError(400, "BadRequest", f'field label not supported: "{key}"')
    return terms


def matches(obj: Obj, labels: list[Any], fields: list[Any]) -> bool:
    meta = obj.get("metadata", {})
    values = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
    }
    for have, terms in ((meta.get("labels") or {}, labels), (values, fields)):
        for key, op, value in terms:
            ok = {
                "=": key in have and have[key] == value,
                "!=": have.get(key) != value,
                "?": key in have,
                "!": key not in have,
            }[op]
            if not ok:
                return False
    return True


@attrs.define(kw_only=True)
class KubernetesEmulator(ScaleSubresource, kmock.KubernetesEmulator):
    _store: dict[Key, Obj] = attrs.field(factory=dict, init=False)
    _kinds: dict[tuple[str, str], str] = attrs.field(factory=dict, init=False)
    _log: list[tuple[int, Key, Obj]] = attrs.field(factory=list, init=False)  # rv, key, event
    _rv: int = attrs.field(default=0, init=False)
    _changed: asyncio.Condition = attrs.field(factory=asyncio.Condition, init=False)
    _closing: bool = attrs.field(default=False, init=False)

    async def close_watches(self) -> None:
        """End every open watch now (called before the server stops)."""
        async with self._changed:
            self._closing = True
            self._changed.notify_all()

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None or not request.resource.plural:
            return await super()._handle(request)  # discovery: /api, /apis/GROUP/VERSION, ...
        try:
            if request.subresource not in (None, "status", "scale"):
                raise ApiError(404, "NotFound", f"subresource {request.subresource} not emulated")
            if request.method == "GET" and request.params.get("watch", "").lower() in ("true", "1"):
                return await self._watch(request)
            async with self._changed:
                code, body = self._serve(request)
                self._changed.notify_all()
        except ApiError as e:
            code, body = e.code, status_body(e.code, e.reason, e.message)
        return aiohttp.web.json_response(body, status=code)

    def _serve(self, request: kmock.Request) -> tuple[int, Obj]:
        res, method = request.resource, request.method
        assert res is not None
        gp = (res.group or "", res.plural or "")
        what = f"{gp[1]}.{gp[0]}".rstrip(".")  # leases.coordination.k8s.io, configmaps
        if request.subresource == "status" and not self._has_status(gp, res.version):
            raise ApiError(404, "NotFound", f"{what} have no status subresource")
        scale = self._scale_paths(gp, res.version) if request.subresource == "scale" else None
        if request.subresource == "scale" and scale is None:
            raise ApiError(404, "NotFound", f"{what} have no scale subresource")
        if request.name is None:
            if method == "GET":
                return 200, self._list(request, gp)
            if method == "POST" and request.subresource is None:
                return 201, self._create(request, gp)
            raise ApiError(405, "MethodNotAllowed", f"{method} on a collection is not emulated")
        key: Key = (*gp, request.namespace, request.name)
        old = self._store.get(key)
        if old is None:
            raise ApiError(404, "NotFound", f'{what} "{request.name}" not found')
        if scale is not None:
            return self._serve_scale(request, key, old, scale)
        if method == "GET":
            return 200, old
        if method == "DELETE":
            return 200, self._delete(key, old)
        body = request.data
        if method == "PATCH" and isinstance(body, dict):
            body = merge_patch(copy.deepcopy(old), body)
        elif method == "PATCH":
            raise ApiError(415, "UnsupportedMediaType", "only merge patches are emulated")
        elif method != "PUT":
            raise ApiError(405, "MethodNotAllowed", f"{method} is not emulated")
        if not isinstance(body, dict) or body.get("metadata", {}).get("name", request.name) != (
            request.name
        ):
            raise ApiError(400, "BadRequest", "the body must be an object of the URL's name")
        rv = (request.data.get("metadata") or {}).get("resourceVersion")
        if rv is not None and rv != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {what} "{request.name}": the object'
                " has been modified; please apply your changes to the latest version and try again",
            )
        return 200, self._update(key, old, body, res.version, request.subresource == "status")

    def _has_status(self, gp: tuple[str, str], version: str | None) -> bool:
        crd = self._store.get((*CRDS, None, f"{gp[1]}.{gp[0]}"))
        if crd is None:
            return gp[1] not in NO_STATUS
        versions = crd.get("spec", {}).get("versions", [])
        return any(
            "status" in (v.get("subresources") or {}) for v in versions if v["name"] == version
        )

    def _emit(self, kind: str, key: Key, obj: Obj) -> Obj:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._log.append((self._rv, key, {"type": kind, "object": copy.deepcopy(obj)}))
        return obj

    def _create(self, request: kmock.Request, gp: tuple[str, str]) -> Obj:
        obj = request.data
        if not isinstance(obj, dict):
            raise ApiError(400, "BadRequest", "the body must be a JSON object")
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        if request.namespace is not None:
            if meta.get("namespace", request.namespace) != request.namespace:
                raise ApiError(400, "BadRequest", "the namespace of the body does not match")
            meta["namespace"] = request.namespace
        key: Key = (*gp, request.namespace, meta["name"])
        if key in self._store:
            what = f"{gp[1]}.{gp[0]}".rstrip(".")
            raise ApiError(409, "AlreadyExists", f'{what} "{meta["name"]}" already exists')
        if self._has_status(gp, request.resource.version if request.resource else None):
            obj.pop("status", None)
        for k in ("deletionTimestamp", "resourceVersion"):
            meta.pop(k, None)
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now, generation=1)
        self._check_replicas(gp, request.resource.version if request.resource else None, obj)
        self._kinds.setdefault(gp, obj.get("kind", ""))
        self._store[key] = self._emit("ADDED", key, obj)
        return obj

    def _update(self, key: Key, old: Obj, body: Obj, version: str | None, status_only: bool) -> Obj:
        has_status = self._has_status((key[0], key[1]), version)
        new = copy.deepcopy(old if status_only else body)
        if status_only or has_status:  # only /status writes status; /status writes nothing else
            src = body if status_only else old
            new.pop("status", None)
            if "status" in src:
                new["status"] = copy.deepcopy(src["status"])
        meta, old_meta = new.setdefault("metadata", {}), old["metadata"]
        for k in ("name", "namespace", "uid", "creationTimestamp", "generation",
                  "deletionTimestamp", "resourceVersion"):  # fmt: skip
            meta.pop(k, None)
            if k in old_meta:
                meta[k] = old_meta[k]
        self._check_replicas((key[0], key[1]), version, new)
        if new == old:
            return old  # a no-op write keeps the resourceVersion and sends no event
        skip = {"metadata", "kind", "apiVersion"} | ({"status"} if has_status else set())
        if any(new.get(k) != old.get(k) for k in (new.keys() | old.keys()) - skip):
            meta["generation"] = old_meta.get("generation", 0) + 1
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            del self._store[key]
            return self._emit("DELETED", key, new)
        self._store[key] = self._emit("MODIFIED", key, new)
        return new

    def _delete(self, key: Key, old: Obj) -> Obj:
        if not old["metadata"].get("finalizers"):
            del self._store[key]
            return self._emit("DELETED", key, old)
        if old["metadata"].get("deletionTimestamp"):
            return old
        new = copy.deepcopy(old)
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        new["metadata"]["deletionTimestamp"] = now
        self._store[key] = self._emit("MODIFIED", key, new)
        return new

    def _selectors(self, request: kmock.Request) -> tuple[list[Any], list[Any]]:
        labels = parse_selector(request.params.get("labelSelector", ""), fields=False)
        fields = parse_selector(request.params.get("fieldSelector", ""), fields=True)
        if request.name is not None:  # a watch of one object by URL
            fields.append(("metadata.name", "=", request.name))
        return labels, fields

    def _wanted(self, request: kmock.Request, gp: Any, key: Key, sel: Any, obj: Obj) -> bool:
        in_ns = request.namespace is None or key[2] == request.namespace
        return key[:2] == gp and in_ns and matches(obj, *sel)

    def _list(self, request: kmock.Request, gp: tuple[str, str]) -> Obj:
        sel = self._selectors(request)
        items = [o for k, o in self._store.items() if self._wanted(request, gp, k, sel, o)]
        res = request.resource
        assert res is not None
        kind = self._kinds.get(gp)
        return {
            "apiVersion": f"{res.group}/{res.version}" if res.group else res.version,
            **({"kind": f"{kind}List"} if kind else {}),
            "metadata": {"resourceVersion": str(self._rv)},
            "items": sorted(items, key=lambda o: int(o["metadata"]["resourceVersion"])),
        }

    async def _watch(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        res = request.resource
        assert res is not None and request._raw_request is not None
        gp = (res.group or "", res.plural or "")
        sel = self._selectors(request)
        since = request.params.get("resourceVersion", "")
        try:
            timeout = float(request.params.get("timeoutSeconds", MAX_WATCH_S))
            start = int(since or 0)
        except ValueError as e:
            raise ApiError(400, "BadRequest", f"invalid watch parameter: {e}") from None
        deadline = asyncio.get_running_loop().time() + min(timeout, MAX_WATCH_S)
        events: list[Obj] = []
        async with self._changed:
            if start == 0:  # "" or "0": the current objects as ADDED, then the changes
                events = [{"type": "ADDED", "object": o} for o in self._list(request, gp)["items"]]
                start = self._rv
            pos = bisect.bisect_right(self._log, start, key=lambda e: e[0])
        response = aiohttp.web.StreamResponse()
        response.content_type = "application/json"
        await response.prepare(request._raw_request)
        with contextlib.suppress(ConnectionError):
            while True:
                for event in events:
                    await response.write(json.dumps(event).encode() + b"\n")
                async with self._changed:
                    while pos == len(self._log) and not self._closing:
                        left = deadline - asyncio.get_running_loop().time()
                        if left <= 0:
                            break
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._changed.wait(), left)
                    batch, pos = self._log[pos:], len(self._log)
                if not batch:
                    break
                events = [e for _, k, e in batch if self._wanted(request, gp, k, sel, e["object"])]
            await response.write_eof()
        return response


@contextlib.contextmanager
def running_emulator(timeout_s: float = 10.0) -> Iterator[str]:
    """Serve a `KubernetesEmulator` on loopback from a background thread; yield its base URL."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        box["stop"] = stop = asyncio.Event()
        emulator = KubernetesEmulator()
        async with emulator, kmock.Server(emulator) as server:
            box["url"] = f"http://{server.host}:{server.port}"
            ready.set()
            await stop.wait()
            await emulator.close_watches()

    def run() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as e:  # reported to the caller below
            box["error"] = e
        finally:
            ready.set()
            loop.close()

    thread = threading.Thread(target=run, name="k8s-emulator", daemon=True)
    thread.start()
    try:
        if not ready.wait(timeout_s) or "url" not in box:
            raise RuntimeError(f"the emulator did not start: {box.get('error')!r}")
        yield box["url"]
    finally:
        if "stop" in box and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                loop.call_soon_threadsafe(box["stop"].set)
        thread.join(timeout_s)
        if thread.is_alive():
            raise RuntimeError("the emulator thread did not stop")
