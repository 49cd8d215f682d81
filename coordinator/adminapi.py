"""``/admin/v1/deployments[/NAME]``: declared deployments, read and changed over HTTP.

``GET`` lists every deployment's status (:func:`.deploybook.status`) or one's; ``POST`` creates
one from a FleetModel document (JSON; 409 if the name exists), ``PUT .../NAME`` creates or
replaces it (``metadata.name`` must be NAME), ``DELETE .../NAME`` removes it (its engines are
stopped). With a ``--deployments`` folder the folder stays the one truth: a change is written
to ``NAME.yaml`` there (or removes it) and the folder is re-read before the answer; a
deployment another file declares is changed by editing that file (409). Without a folder the
changes live in the coordinator's memory. When the coordinator has an admin key, every call
needs ``Authorization: Bearer KEY`` (401 otherwise). Errors are OpenAI-shaped JSON.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import yaml

from fleet.protocol.errors import ConfigError

from .deploybook import API, status
from .deployspec import parse_model
from .errors import ApiError, DeploymentError, InvalidRequest
from .validation import parse_json_object

if TYPE_CHECKING:
    from .apiports import AdminPorts


class Unauthorized(ApiError):
    """The admin API needs a key this request did not give (401)."""

    status = 401

    def __init__(self) -> None:
        super().__init__(
            "The admin API needs `Authorization: Bearer <admin key>`.", code="invalid_admin_key"
        )


class NotFound(ApiError):
    """No deployment by that name (404)."""

    status = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"No deployment named `{name}`.", param="name", code="not_found")


class Conflict(ApiError):
    """The change clashes with what exists (409)."""

    status = 409


def authorize(coord: AdminPorts, headers: dict[str, str]) -> None:
    """Check the admin key, if the coordinator has one.

    Raises:
        Unauthorized: a missing or wrong key.
    """
    key = coord.cfg.admin_key
    if not key:
        return
    given = headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), key):
        raise Unauthorized()


def listing(coord: AdminPorts) -> dict[str, Any]:
    """``GET /admin/v1/deployments``."""
    book = coord.book
    out: dict[str, Any] = {"deployments": _status(coord)}
    if book.folder is not None:
        out["folder"] = str(book.folder)
        out["folderError"] = book.folder_error
    return out


def one(coord: AdminPorts, name: str) -> dict[str, Any]:
    """``GET /admin/v1/deployments/NAME``.

    Raises:
        NotFound: no deployment by that name.
    """
    for entry in _status(coord):
        if entry["name"] == name:
            return entry
    raise NotFound(name)


async def put(coord: AdminPorts, raw: bytes, name: str | None) -> tuple[dict[str, Any], int]:
    """``POST`` (``name`` None) or ``PUT .../NAME``: the deployment's status and 201 (created)
    or 200 (replaced).

    Raises:
        InvalidRequest: the body is not a valid FleetModel (the message names every field).
        Conflict: POST of an existing name; a name another origin declares.
    """
    _shared_or_refuse(coord)
    doc = parse_json_object(raw)
    try:
        model = parse_model(doc)
    except DeploymentError as exc:
        raise InvalidRequest(str(exc), param=exc.key) from exc
    if name is not None and model.name != name:
        raise InvalidRequest(
            f"`metadata.name` is `{model.name}`, the URL names `{name}`.", param="metadata.name"
        )
    existing = coord.book.get(model.name) or _shorthand(coord, model.name)
    if name is None and existing is not None:
        raise Conflict(f"A deployment named `{model.name}` exists; PUT replaces it.",
                       param="metadata.name", code="exists")  # fmt: skip
    folder = coord.book.folder
    if folder is not None:
        path = _own_file(coord, folder, model.name)
        text = yaml.safe_dump(model.to_dict(), sort_keys=False)
        await trio.to_thread.run_sync(_write_atomic, path, text)
        if not await coord.reload_folder():
            await trio.to_thread.run_sync(path.unlink)  # put the folder back as it was
            await coord.reload_folder()
            raise InvalidRequest(f"The folder rejected it: {coord.book.folder_error}")
    else:
        try:
            coord.book.put(model, API)
        except ConfigError as exc:
            raise Conflict(str(exc), param="metadata.name", code="exists") from exc
        coord.apply_declared()
    return one(coord, model.name), 200 if existing is not None else 201


async def delete(coord: AdminPorts, name: str) -> dict[str, Any]:
    """``DELETE .../NAME``: its engines are stopped.

    Raises:
        NotFound: no deployment by that name.
        Conflict: the command line or another file declares it.
    """
    _shared_or_refuse(coord)
    if _shorthand(coord, name) is not None:
        raise Conflict(f"`{name}` comes from the command line (--model).", param="name")
    if coord.book.get(name) is None:
        raise NotFound(name)
    folder = coord.book.folder
    if folder is not None:
        path = _own_file(coord, folder, name)
        await trio.to_thread.run_sync(path.unlink)
        await coord.reload_folder()
    else:
        coord.book.delete(name, API)
        coord.apply_declared()
    return {"deleted": name}


def _shared_or_refuse(coord: AdminPorts) -> None:
    """Several coordinators (a leader lock) share deployments through the folder only: one
    kept in this process's memory would be unknown to the others.

    Raises:
        Conflict: several coordinators and no folder.
    """
    if coord.cfg.leader_lock is not None and coord.book.folder is None:
        raise Conflict(
            "Several coordinators serve this fleet: declare deployments in a shared "
            "--deployments folder (the admin API then writes there).",
            code="no_shared_store",
        )


def _status(coord: AdminPorts) -> list[dict[str, Any]]:
    return status(
        coord.placer,
        coord.registry,
        coord.book,
        coord.deployment_notes,
        trio.current_time(),
        groups=coord.groups,
    )


def _shorthand(coord: AdminPorts, name: str) -> object | None:
    return next((d for d in coord.book.shorthand if d.name == name), None)


def _own_file(coord: AdminPorts, folder: Path, name: str) -> Path:
    """The file of ``name`` in the folder: ``NAME.yaml``, unless another file declares it.

    Raises:
        Conflict: another file declares it (edit that file instead).
    """
    path = folder / f"{name}.yaml"
    held = coord.book.get(name)
    if held is not None and held[0] != path.name:
        raise Conflict(f"`{name}` is declared in {held[0]}; edit that file.", param="name")
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


__all__ = ["authorize", "delete", "listing", "one", "put"]
