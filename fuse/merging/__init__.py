"""Parameter-space merging of homologous checkpoints (SCE, VaRM, TIES, DARE, …), streamed tensor by tensor.

Used by the merge stage (fuse.stages.merge) and alone through `fuse merge CONFIG` (fuse.merging.cli).
"""

from fuse.merging.config import MergeConfig, MergeModel, load_merge_config
from fuse.merging.methods import METHODS, MergeConfigError, get_method, merge_method
from fuse.merging.preflight import PreflightError

__all__ = [
    "METHODS",
    "MergeConfig",
    "MergeConfigError",
    "MergeModel",
    "PreflightError",
    "get_method",
    "load_merge_config",
    "merge_method",
    "run_merge",
]


def run_merge(*args, **kwargs):  # noqa: ANN002, ANN003 — the engine imports torch; keep `import fuse.merging` light
    from fuse.merging.engine import run_merge as run

    return run(*args, **kwargs)
