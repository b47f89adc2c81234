"""The README's commands, run as written: every `mapdit`, `python train.py` / `sample.py` and `make` line
parses with the real parsers, the quick start runs end to end (with a tiny training budget appended), the
Python snippet runs, every linked file exists, and docs/cli.md is what the parsers give."""
from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
from pathlib import Path

import pytest

from helpers import needs_fmnist

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 150
# my own docs, whose links are checked with the README's
DOCS = [README, ROOT / "docs" / "guide.md", ROOT / "docs" / "results-log.md", ROOT / "docs" / "cli.md"]

# appended to the quick start's commands as written (argparse: the last value wins), so that they take seconds
TINY = {
    "train": ["--num-steps", "6", "--global-batch-size", "8", "--log-every", "2", "--ckpt-every", "6"],
    "sample": ["--num-samples", "2", "--steps", "3"],
    "fid": ["--num-samples", "16", "--steps", "3"],
    "ema": [],
}


def readme() -> str:
    return README.read_text()


def sections(text: str) -> dict[str, str]:
    """'## Title' -> its text (the part before the first title under '')."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    out = {"": parts[0]}
    out.update({title.strip(): body for title, body in zip(parts[1::2], parts[2::2])})
    return out


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{re.escape(lang)}\n(.*?)^```", text, flags=re.M | re.S)


def command_lines(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            lines.append(line)
    return lines


def as_mapdit_argv(line: str) -> list[str] | None:
    """The `mapdit` arguments a README line stands for, or None for a line that is not a mapdit command
    (`pip`, `make`, ...). `python train.py X` is `mapdit train X`; torchrun's own options are dropped."""
    words = shlex.split(line)
    if words[0] == "mapdit":
        return words[1:]
    if words[0] == "torchrun":
        words = ["python"] + words[next(i for i, w in enumerate(words) if w.endswith(".py")):]
    if words[0] in ("python", "python3") and words[1] in ("train.py", "sample.py"):
        return [words[1][:-3]] + words[2:]
    return None


def parse(argv: list[str]):
    """argparse's result for `mapdit ARGV` from the real parser; a parse error fails with argparse's line."""
    from mapdit.cli import build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"`mapdit {shlex.join(argv)}` does not parse: {err.getvalue().strip()}")


def all_commands() -> list[str]:
    return [line for block in code_blocks(readme(), "bash") for line in command_lines(block)]


# ------------------------------------------------------------------------------------------------
# shape and links
# ------------------------------------------------------------------------------------------------
def test_readme_is_short_and_usage_first():
    text = readme()
    lines = text.splitlines()
    assert len(lines) <= MAX_LINES, len(lines)
    titles = list(sections(text))[1:]
    # what it is, the two commands and the quick start come first; results and citations after the usage
    assert titles[:3] == ["Two commands", "Quick start", "From Python"], titles
    assert "![" in sections(text)[""] and "docs/demo_grid.png" in sections(text)[""]


def slug(title: str) -> str:
    """GitHub's anchor of a markdown title: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_linked_file_and_anchor_exists(doc):
    text = doc.read_text()
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://", t)]
    assert targets or doc != README
    for target in targets:
        path, _, anchor = target.partition("#")
        file = doc.parent / path if path else doc
        assert file.exists(), f"{doc.name} links {target}: no such file"
        if anchor and file.suffix == ".md":
            titles = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
            assert anchor in {slug(t) for t in titles}, f"{doc.name} links {target}: no such section"


def test_citations_and_license():
    text = readme()
    for key in ("2505.19122", "Analyzing and Improving the Training Dynamics of Diffusion Models",
                "Scalable Diffusion Models with Transformers"):
        assert key in text
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "LICENSE").exists() and "](LICENSE)" in text


# ------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------
def test_every_command_parses_with_the_real_parser():
    commands = all_commands()
    mapdit = [argv for argv in map(as_mapdit_argv, commands) if argv is not None]
    assert len(mapdit) >= 6, commands
    for argv in mapdit:
        parse(argv)
    makefile = (ROOT / "Makefile").read_text()
    for line in commands:
        if line.startswith("make "):
            for target in line.split()[1:]:
                assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"no make target {target}"


def test_cli_reference_is_up_to_date():
    """docs/cli.md is what `python docs/make_cli_docs.py` writes from today's parsers."""
    gen = runpy.run_path(str(ROOT / "docs" / "make_cli_docs.py"))
    assert (ROOT / "docs" / "cli.md").read_text() == gen["render"](), \
        "docs/cli.md is out of date: run python docs/make_cli_docs.py"


@pytest.mark.slow
@needs_fmnist
def test_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    """The quick start's commands in order, as written, from a fresh folder (their relative paths land in
    it), each with TINY appended; then the Python snippet against the run they made (1000 samples -> 16)."""
    from helpers import cli

    monkeypatch.chdir(tmp_path)
    lines = [line for block in code_blocks(sections(readme())["Quick start"], "bash") for line in command_lines(block)]
    ran = []
    for line in lines:
        argv = as_mapdit_argv(line)
        if argv is None:  # pip install: this environment has it
            continue
        status = cli(*argv, *TINY[argv[0]])
        assert status == 0, f"`{line}` exited {status}: {capsys.readouterr().err[-2000:]}"
        ran.append(argv[0])
    assert ran[0] == "train" and {"sample", "fid", "ema"} <= set(ran), ran
    snippet = code_blocks(sections(readme())["From Python"], "python")
    assert len(snippet) == 1 and len(snippet[0].strip().splitlines()) <= 10
    code = re.sub(r"\b1000\b", "16", snippet[0])  # the snippet's sample count, shrunk like TINY
    exec(compile(code, "README.md", "exec"), {})
