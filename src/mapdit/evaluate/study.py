"""Temporary: the old home of the study's figure writer, for `benchmarks/samplers.py` processes started
before the study moved to mapdit.experiments (they import `_save` from here when they plot). Delete this
file once no such process runs; new code uses mapdit.plots.save_figure."""
from mapdit.plots import save_figure as _save  # noqa: F401
