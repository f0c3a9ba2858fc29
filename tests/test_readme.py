"""The README walked top to bottom in a fresh copy of the repository: every fenced command exits 0.

Every ```bash and ```python block runs in the order it appears, in a copy of the tracked files (so the
earlier commands' ``runs/`` folders are what the later ones read, as for a reader). Long runs are
shortened with their own flags only (:func:`shorten`): ``--epochs 1``, ``--time-limit``, ``--steps``,
``--quick``; nothing else changes. ``pip install`` lines are checked, not run (the extras they name
must exist in setup.py: the test must not need the network), and ``python -m pytest`` collects the
suite instead of running it inside itself. The walk uses the NumPy backend, so a fresh copy does not
spend its minute compiling the Numba kernels (their path has its own tests).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OPTIONAL = ("torch",)
"""Packages a README block may use that no extra installs (PyTorch: the weights-in-PyTorch example). Where one
is missing its block is compiled, not run; where it is installed (as on the CI machine) the block runs."""


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced ``bash`` and ``python`` block, in order."""
    return [(m[1], m[2]) for m in re.finditer(r"^```(bash|python)\n(.*?)^```", text, flags=re.M | re.S)]


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag value`` replacing any value of ``flag`` already there."""
    if flag in argv:
        i = argv.index(flag)
        return [*argv[:i], flag, value, *argv[i + 2 :]]
    return [*argv, flag, value]


def shorten(argv: list[str]) -> list[str]:
    """A README command with its long runs shortened by their own flags (module docstring)."""
    if argv[:1] == ["nflow"]:
        argv = [sys.executable, "-m", "nflow_np", *argv[1:]]
        command = next((word for word in argv[3:] if not word.startswith("-") and word not in ("numpy", "numba")),
                       None)
        if command == "train" and "--resume" not in argv:
            if "--model" in argv and argv[argv.index("--model") + 1] == "gmm":
                argv = _set(argv, "--components", "1,2")
            else:
                argv = _set(argv, "--epochs", "1")
            if "mnist" in argv:
                argv = _set(argv, "--time-limit", "5")
        if command == "vi":
            for flag, value in (("--steps", "20"), ("--anneal-steps", "10"), ("--samples", "200"), ("--grid", "20")):
                argv = _set(argv, flag, value)
        if command == "bench":
            argv = [*argv, *([] if "--quick" in argv else ["--quick"]), "--repeats", "1", "--no-torch", "--no-plots"]
            argv = argv if "--sections" in argv else [*argv, "--sections", "train"]
        return argv
    if argv[:3] == ["python", "-m", "benchmarks"]:
        rest = argv[3:]
        extra = ["--repeats", "1", "--no-torch", "--no-plots", *([] if "--quick" in rest else ["--quick"])]
        sections = [] if "--sections" in rest else ["--sections", "train"]
        return [sys.executable, "-m", "benchmarks", *rest, *extra, *sections]
    if argv[:3] == ["python", "-m", "benchmarks.bench_memory"]:
        return [sys.executable, *argv[1:], "--depths", "2", "4", "--repeats", "1", "--rows", "64"]
    if argv[:3] == ["python", "-m", "pytest"]:
        return [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    if argv[:1] == ["python"]:
        return [sys.executable, *argv[1:]]
    return argv


def check_install(argv: list[str], setup: str) -> None:
    """A ``pip install -e '.[a,b]'`` line names only extras that setup.py defines."""
    target = argv[-1]
    extras = re.fullmatch(r"\.(?:\[([\w,]+)\])?", target)
    assert extras is not None, f"unexpected install target {target!r}"
    for extra in (extras[1] or "").split(","):
        assert not extra or f'"{extra}":' in setup, f"setup.py has no extra {extra!r}"


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tracked files of this checkout, as they are in the working tree, in a fresh folder."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    target = tmp_path_factory.mktemp("clone")
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_the_readme_runs_top_to_bottom(clone: Path) -> None:
    readme = (clone / "README.md").read_text(encoding="utf-8")
    setup = (clone / "setup.py").read_text(encoding="utf-8")
    env = os.environ | {"PYTHONPATH": str(clone), "NFLOW_BACKEND": "numpy", "MPLBACKEND": "Agg"}
    blocks = readme_blocks(readme)
    assert sum(language == "bash" for language, _ in blocks) >= 7
    figures = {path.name: path.read_bytes() for path in (clone / "docs" / "figures").iterdir()}
    ran = []
    for language, body in blocks:
        if language == "python":
            code = re.sub(r"epochs=\d+", "epochs=1", body)
            missing = [name for name in OPTIONAL if re.search(rf"^(import|from) {name}\b", code, re.M)
                       and importlib.util.find_spec(name) is None]
            if missing:  # a reader's optional package this machine lacks: the block must still be valid Python
                compile(code, f"README block needing {missing}", "exec")
                continue
            commands = [[sys.executable, "-c", code]]
        else:
            commands = []
            for line in body.splitlines():
                line = re.split(r"\s+#", line, maxsplit=1)[0].strip()
                for part in filter(None, (piece.strip() for piece in line.split("&&"))):
                    argv = shlex.split(part)
                    if argv[:4] == ["python", "-m", "pip", "install"]:
                        check_install(argv, setup)
                        continue
                    commands.append(shorten(argv))
        for argv in commands:
            done = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            ran.append(argv)
    assert (clone / "runs" / "two_moons-realnvp" / "model.json").exists()
    # the own-data example: a model of my.csv with its standardisation, new rows scored, a mixture of the same file
    mine = json.loads((clone / "runs" / "mine" / "model.json").read_text(encoding="utf-8"))["metadata"]
    assert mine["data_file"]["columns"] == ["height_cm", "weight_kg"] and "standardization" in mine
    assert len((clone / "scores.csv").read_text().splitlines()) == 1 + 5
    assert (clone / "runs" / "mine-gmm" / "gmm.npz").exists()
    # no benchmark rewrote a tracked figure: they write under runs/
    assert {path.name: path.read_bytes() for path in (clone / "docs" / "figures").iterdir()} == figures
    assert len(ran) >= 25
