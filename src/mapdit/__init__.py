"""mapdit: magnitude-preserving diffusion transformers (MaP-DiT) in PyTorch."""
import os as _os

# OpenMP threads that wait for work sleep instead of spinning. Spinning threads of two runs sharing the
# cores (a training beside a test run) take each other's time slices: two 2-thread runs then crawled at
# 1/5 of their speed alone; passive waiting keeps each near its fair half (BENCHMARKS.md, "Sharing the
# CPU"). Read by the OpenMP runtime when torch first loads, so it is set before any torch import; a
# value the user exported wins, and so does an exported GOMP_SPINCOUNT (libgomp: spin that long, then sleep).
if "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# The Python API (mapdit.api, docs/python-api.md), loaded on first use so that `import mapdit` stays light.
_API = ("load_run", "load_dit_checkpoint", "build_model", "Pipeline", "SamplerSpec", "run_config")
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'mapdit' has no attribute {name!r}")
