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
