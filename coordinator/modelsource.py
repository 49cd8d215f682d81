"""Where a deployment's model comes from: re-exported from :mod:`fleet.protocol.modelsource`.

The parser moved to ``protocol/`` so the agent's model store parses sources the same way the
coordinator validates them (``agent/`` and ``coordinator/`` never import each other).
"""

from __future__ import annotations

from fleet.protocol.modelsource import ModelSource, SourceScheme

__all__ = ["ModelSource", "SourceScheme"]
