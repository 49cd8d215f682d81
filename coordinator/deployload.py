"""Load a set of deployments: YAML text, a folder of YAML files, and checks across deployments.

:func:`load_folder` reads every ``*.yaml``/``*.yml``/``*.json`` file of a folder (not recursive;
hidden files are skipped), each holding one or more documents (``---`` between them; empty
documents are skipped), and returns every deployment, or raises one :class:`DeploymentsError`
listing every problem of every file, each line prefixed with the file (and the document number in
files of several). :func:`parse_documents` is the same without the file system, and
:func:`check_fleet` the checks that need every deployment at once (unique names; a served name's
weights not all 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from .deployspec import FleetModel, parse_model
from .errors import DeploymentError, DeploymentsError

SUFFIXES = (".yaml", ".yml", ".json")


def parse_documents(text: str, origin: str) -> tuple[list[FleetModel], list[str]]:
    """Parse every document of one YAML (or JSON) text.

    Args:
        text: the file's contents.
        origin: how problems name the file (``chat.yaml``).

    Returns:
        The deployments that parsed, and every problem as a line starting with ``origin``
        (``chat.yaml (document 2): deployment 'x': spec.replicas: ...``).
    """
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        return [], [f"{origin}:{where} not valid YAML: {problem}"]
    numbered = [(i + 1, d) for i, d in enumerate(docs) if d is not None]
    models: list[FleetModel] = []
    problems: list[str] = []
    for number, doc in numbered:
        label = f"{origin} (document {number})" if len(docs) > 1 else origin
        try:
            models.append(parse_model(doc))
        except DeploymentError as exc:
            problems.extend(f"{label}: {line}" for line in exc.lines)
    return models, problems


def check_fleet(models: Sequence[FleetModel]) -> list[tuple[str, str]]:
    """Checks across deployments.

    Args:
        models: every deployment.

    Returns:
        ``(deployment name, problem)`` pairs: a name used twice (reported on the second), and a
        served name whose deployments all have ``trafficWeight: 0`` (no version would take new
        sessions; reported on each).
    """
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for m in models:
        if m.name in seen:
            problems.append((m.name, f"deployment {m.name!r}: metadata.name: defined twice"))
        seen.add(m.name)
    serving: dict[str, list[FleetModel]] = {}
    for m in models:
        for served in m.served_model_names:
            serving.setdefault(served, []).append(m)
    for served, group in sorted(serving.items()):
        if all(m.traffic_weight == 0 for m in group):
            names = ", ".join(m.name for m in group)
            for m in group:
                problems.append(
                    (
                        m.name,
                        f"deployment {m.name!r}: spec.trafficWeight: every deployment serving "
                        f"{served!r} has weight 0 ({names}); one needs a weight > 0",
                    )
                )
    return problems


def load_folder(folder: Path) -> tuple[FleetModel, ...]:
    """Read every deployment in a folder.

    Args:
        folder: the ``--deployments`` folder.

    Returns:
        Every deployment, ordered by file name, then by position in the file.

    Raises:
        DeploymentsError: the folder cannot be read, or any document has problems; lists all of
            them with their files.
    """
    return load_folder_files(folder)[0]


def load_folder_files(folder: Path) -> tuple[tuple[FleetModel, ...], dict[str, str]]:
    """:func:`load_folder`, and the file (name within the folder) declaring each deployment.

    Raises:
        DeploymentsError: as :func:`load_folder`.
    """
    try:
        files = sorted(
            p
            for p in folder.iterdir()
            if p.suffix in SUFFIXES and not p.name.startswith(".") and p.is_file()
        )
    except OSError as exc:
        raise DeploymentsError(str(folder), [f"cannot read the folder: {exc}"]) from exc
    models: list[FleetModel] = []
    origins: dict[str, str] = {}
    problems: list[str] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{path.name}: cannot read it: {exc}")
            continue
        found, bad = parse_documents(text, path.name)
        problems.extend(bad)
        for m in found:
            first = origins.get(m.name)
            if first is not None and first != path.name:
                problems.append(
                    f"{path.name}: deployment {m.name!r}: metadata.name: already defined in {first}"
                )
                continue
            origins[m.name] = path.name
            models.append(m)
    for name, problem in check_fleet(models):
        problems.append(f"{origins.get(name, '?')}: {problem}")
    if problems:
        raise DeploymentsError(str(folder), problems)
    return tuple(models), origins


def folder_signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes when a deployment file is added, removed or written: (name, size,
    mtime in ns) of each file :func:`load_folder` reads; empty when the folder is unreadable."""
    try:
        return tuple(
            sorted(
                (p.name, st.st_size, st.st_mtime_ns)
                for p in folder.iterdir()
                if p.suffix in SUFFIXES and not p.name.startswith(".")
                for st in [p.stat()]
            )
        )
    except OSError:
        return ()


__all__ = [
    "SUFFIXES",
    "check_fleet",
    "folder_signature",
    "load_folder",
    "load_folder_files",
    "parse_documents",
]
