"""Prometheus' ``promtool`` for tests, and the metric names PromQL expressions and scrapes name.

``promtool`` comes from Debian's ``prometheus`` package (``make install`` puts it there when
missing). Expressions are read with a careful regex rather than a PromQL parser (none is on
PyPI for Python 3.11 that we trust): strings, label matchers, ranges and grouping clauses are
removed first, then every identifier not called as a function and not a keyword is a metric.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

TIMEOUT_S = 60.0

_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on", "ignoring",
     "group_left", "group_right", "atan2"}
)  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_WORD = re.compile(r"(?<![\w:$.])([A-Za-z_:][\w:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"^\s*(?:label_values|query_result)\s*\((.*)\)\s*$", re.S)


def promtool(*args: str, stdin: str | None = None, cwd: Path | None = None) -> str:
    """Run ``promtool ARGS``; its output. Fails the test, with that output, on a non-zero exit.

    Raises:
        pytest.fail: promtool is not installed, or it reported a problem.
    """
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail(
            "promtool is not installed: `make install` installs it (as root: "
            "apt-get install prometheus)",
            pytrace=False,
        )
    result = subprocess.run(
        [binary, *args], input=stdin, capture_output=True, text=True, cwd=cwd,
        timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"promtool {' '.join(args)} failed:\n{output}", pytrace=False)
    return output


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana ``label_values(...)``) selects."""
    templated = _LABEL_VALUES.match(expr)
    if templated:  # label_values(metric{...}, label) or label_values(label)
        parts = _MATCHERS.sub("", templated.group(1)).split(",")
        return metric_names(parts[0]) if len(parts) > 1 else set()
    text = _RANGE.sub("", _MATCHERS.sub("", _STRING.sub('""', expr)))
    while True:  # grouping lists may follow nested parentheses: strip until none is left
        stripped = _GROUPING.sub("", text)
        if stripped == text:
            break
        text = stripped
    return {
        m.group(1)
        for m in _WORD.finditer(text)
        if m.group(2) is None and m.group(1) not in _KEYWORDS
    }


def exposed_names(scrape: str) -> set[str]:
    """Every series name a text exposition can hold, from its ``# TYPE`` lines (a histogram's
    ``_bucket``, ``_sum`` and ``_count`` too), so families with no sample yet count."""
    out: set[str] = set()
    suffixes = {
        "counter": ("",),
        "gauge": ("",),
        "untyped": ("",),
        "info": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
    }
    for line in scrape.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[:2] == ["#", "TYPE"]:
            out.update(parts[2] + s for s in suffixes.get(parts[3], ("",)))
        elif line and not line.startswith("#"):
            out.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return out


def check_metrics(scrape: str) -> str:
    """``promtool check metrics`` of a scrape; its output (empty when it finds nothing)."""
    return promtool("check", "metrics", stdin=scrape)


def unknown(exprs: Iterable[tuple[str, str]], known: set[str]) -> list[str]:
    """``where: name`` for each metric an expression names that ``known`` lacks."""
    return [f"{where}: {n}" for where, e in exprs for n in sorted(metric_names(e) - known)]


__all__: Sequence[str] = ["check_metrics", "exposed_names", "metric_names", "promtool", "unknown"]
