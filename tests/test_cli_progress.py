"""What ``nflow`` says while it works: the kernel-compilation line, one progress bar over a whole image run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nflow_np import backend
from nflow_np.cli import main
from nflow_np.image_training import build_image_model, fit_for

TINY = "--epochs 1 --n-train 256 --n-val 64 --n-test 64 --layers 2 --hidden 8 --batch-size 64 --no-plots".split()


def test_kernel_compilation_is_announced_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("numba")
    with backend.using(backend.get_backend()):
        assert main(["--backend", "numba", "train", *TINY, "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "preparing the numba kernels" in line)
    assert "compiled on first use" in line and " done in " in line
    assert err.index("preparing the numba kernels") < err.index("train")  # before the bar starts
    with backend.using("numpy"):
        assert main(["train", *TINY, "--out", str(tmp_path / "reference")]) == 0
    assert "preparing" not in capsys.readouterr().err  # nothing to compile


def test_fit_for_reports_every_epoch_to_its_callback() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 17, (96, 1, 8, 8)).astype(np.float32)
    model = build_image_model("realnvp", (1, 8, 8), 17, (8,), 0.05, np.float32, 0)
    seen = []
    run = fit_for(model, images[:64], images[64:], epochs=3, batch_size=32, lr=1e-3, weight_decay=0.0, patience=None,
                  time_limit=None, on_epoch=seen.append)
    assert [entry["epoch"] for entry in seen] == [1, 2, 3] == [entry["epoch"] for entry in run["history"]]
    assert all(np.isfinite(entry["val_nll"]) for entry in seen)


def test_one_bar_over_the_whole_image_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    import nflow_np.image_training

    def three_epochs(data: str, model: str, out: Path, *, on_epoch, epochs: int, **settings: object) -> dict:
        for epoch in (1, 2, 3):
            on_epoch({"epoch": epoch, "val_nll": 100.0 - epoch})
        return {"test_nll": 1.0, "test_bits_per_dim": 1.0, "test_log_likelihood_01": 1.0, "best_epoch": 3,
                "epochs_run": 3, "steps": 30, "train_seconds": 1.0}

    monkeypatch.setattr(nflow_np.image_training, "train_image_model", three_epochs)
    with backend.using("numpy"):
        assert main(["train", "--data", "digits", "--out", str(tmp_path / "digits")]) == 0
    err = capsys.readouterr().err
    assert "3/150" in err and "val_nll=97.00" in err  # epoch k of the recipe's 150, the latest validation NLL
    assert "1/1 " not in err  # no per-epoch bar restarting from zero
