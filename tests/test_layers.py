"""The layers: the metrics layer (mapdit.evaluate) never imports training or the experiments, and no
library module imports argparse or the command layer. Each module is imported in a fresh interpreter."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mapdit"
METRICS = sorted(f"mapdit.evaluate.{p.stem}" for p in (SRC / "evaluate").glob("*.py") if p.stem != "__init__")
# training is train.py and the modules it is split into; the Python API samples and scores above the metrics
TRAINING = ("mapdit.train", "mapdit.setup", "mapdit.step", "mapdit.run_writer", "mapdit.resume", "mapdit.stopping")
ABOVE_METRICS = (*TRAINING, "mapdit.api", "mapdit.experiments", "mapdit.commands", "mapdit.cli")
COMMAND_LAYER = ("mapdit.cli", "mapdit.commands")
LIBRARY = sorted(
    ".".join(("mapdit", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
    for p in SRC.rglob("*.py") if p.parts[len(SRC.parts)] != "commands" and p.name != "cli.py")


def loaded_after_import(module: str) -> set[str]:
    """The names in sys.modules after importing `module` in a fresh interpreter."""
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(out.stdout.split())


def _offending(loaded: set[str], prefixes) -> list[str]:
    return sorted(m for m in loaded if any(m == p or m.startswith(p + ".") for p in prefixes))


def test_the_layer_lists_are_not_empty():
    assert "mapdit.evaluate.fid" in METRICS and "mapdit.evaluate.magnitudes" in METRICS
    assert "mapdit.train" in LIBRARY and "mapdit.experiments.study" in LIBRARY and "mapdit.cli" not in LIBRARY


@pytest.mark.parametrize("module", METRICS)
def test_metrics_layer_imports_neither_training_nor_experiments(module):
    loaded = loaded_after_import(module)
    assert module in loaded
    assert _offending(loaded, ABOVE_METRICS) == []


def test_the_check_can_fail():
    # an experiments module pulls in training: the same check sees it
    loaded = loaded_after_import("mapdit.experiments.ablate")
    assert "mapdit.train" in _offending(loaded, ABOVE_METRICS)


@pytest.mark.slow
def test_library_modules_import_no_argparse_and_no_command_layer():
    code = ("import sys\n"
            f"for name in {LIBRARY!r}:\n"
            "    __import__(name)\n"
            "print('\\n'.join(sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = set(out.stdout.split())
    assert _offending(loaded, COMMAND_LAYER) == []
    # no parser in the library (model.py imports argparse only to allow argparse.Namespace while unpickling
    # original DiT checkpoints, weights-only)
    for path in SRC.rglob("*.py"):
        if path.parts[len(SRC.parts)] == "commands" or path.name == "cli.py":
            continue
        text = path.read_text()
        for word in ("ArgumentParser", "add_argument", "add_parser", "def register("):
            assert word not in text, (path, word)
        assert "import argparse" not in text or path.name == "model.py", path


@pytest.mark.parametrize("exported", [{}, {"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "1000"}])
def test_import_leaves_the_openmp_settings_to_the_user(exported):
    # mapdit once exported OMP_WAIT_POLICY=PASSIVE on import; alone on idle cores that cost the demo's loop a
    # third of its speed (BENCHMARKS.md, "Sharing the CPU"). Whatever the user exported reaches OpenMP as is.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = "import os, mapdit; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env={**env, **exported}, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == f"{exported.get('OMP_WAIT_POLICY')} {exported.get('GOMP_SPINCOUNT')}"
