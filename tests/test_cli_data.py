"""``nflow train --data FILE``, ``nflow eval DIR --data FILE``, ``nflow sample`` in the file's units (cli_data.py).

Runs that train are in process (``main``) and tiny; errors go through the real ``python -m nflow_np`` in
a subprocess (one line on stderr, exit code 2, no traceback), as in tests/test_cli_options.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import numerical_jacobian
from test_cli_options import Interrupted, assert_one_line_error, interrupt_at_step, nflow

from nflow_np import FlowModel, Sequential
from nflow_np.cli import main
from nflow_np.data import load_toy
from nflow_np.data.prepare import prepare_data
from nflow_np.flows import Standardize
from nflow_np.gmm import GaussianMixture
from nflow_np.io import ModelFileError, load_model, read_config
from nflow_np.train import evaluate_nll

TINY = "--epochs 2 --layers 2 --hidden 8 --batch-size 64 --no-progress --no-plots".split()
FIXTURES = Path(__file__).parent / "fixtures"


def table(n: int, seed: int = 0) -> np.ndarray:
    """Three correlated columns in very different units (means 100, −5, 0.003; spreads 10, 0.1, 0.001)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, 3))
    a[:, 1] += 0.8 * a[:, 0]
    return np.array([100.0, -5.0, 0.003]) + a * np.array([10.0, 0.1, 0.001])


def write_csv(path: Path, x: np.ndarray, header: str | None = "height,temp,rate", delimiter: str = ",") -> Path:
    np.savetxt(path, x, delimiter=delimiter, header=header or "", comments="", fmt="%.17g")
    return path


def inner_model(model: FlowModel) -> FlowModel:
    """The flow behind a file-trained model's ``Standardize`` layer: the model of the standardised rows ``u``."""
    assert type(model.flow[0]) is Standardize
    return FlowModel(Sequential(model.flow.flows[1:]), model.base)


def numerical_log_density(inner: FlowModel, mean: np.ndarray, std: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``log p_Z(z(x)) + log|det ∂z/∂x|`` of the whole map ``x → u → z`` (``inner`` maps ``u → z``), its Jacobian by
    central differences: independent of the ``−Σ log σ`` formula under test."""
    def z_of(rows: np.ndarray) -> np.ndarray:
        return inner.flow.forward((rows - mean) / std)[0]

    return np.array([inner.base.log_prob(z_of(row[None]))[0] + np.linalg.slogdet(numerical_jacobian(z_of, row))[1]
                     for row in x])


def test_train_on_a_csv_then_eval_and_sample_in_its_units(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_csv(tmp_path / "my.csv", table(600))
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), *TINY, "--seed", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "my.csv: 600 rows of 3 columns; 480 train, 60 validation, 60 test (seed 3)" in printed

    prepared = prepare_data(data, seed=3)  # what the run must have trained on and recorded
    mean, std = prepared.standardization.mean, prepared.standardization.std
    config = read_config(out)
    assert config["flow"]["flows"][0] == {"kind": "standardize", "dim": 3}  # the model saved is Standardize ∘ flow
    record = config["metadata"]["standardization"]
    np.testing.assert_array_equal(record["mean"], mean)
    np.testing.assert_array_equal(record["std"], std)
    np.testing.assert_allclose(record["mean"], prepared.raw.train.mean(axis=0), rtol=1e-12)
    assert config["metadata"]["data_file"]["sha256"] == prepared.source["sha256"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_sha256"] == config["sha256"]
    assert summary["data_file"]["path"] == str(data.resolve())

    # eval DIR: the run's own test split, rebuilt from the file: summary.json's number, in the file's units
    assert main(["eval", str(out)]) == 0
    assert f"test NLL {summary['test_nll']:.4f} nats on my.csv (its 60 test rows, seed 3)" in capsys.readouterr().out
    model = load_model(out)
    np.testing.assert_array_equal(model.flow[0].buffers["mean"], mean)
    np.testing.assert_array_equal(model.flow[0].buffers["std"], std)
    assert summary["test_nll"] == evaluate_nll(model, prepared.raw.test)  # the loaded model on the file's rows
    inner = inner_model(model)  # what the optimizer trained, on the standardised rows
    sum_log_std = float(np.log(std).sum())
    assert summary["test_nll"] == pytest.approx(evaluate_nll(inner, prepared.splits.test) + sum_log_std, rel=1e-13)
    # the history too is in the file's units: the best epoch's validation NLL is summary.json's
    best = next(entry for entry in summary["history"] if entry["epoch"] == summary["best_epoch"])
    assert best["val_nll"] == pytest.approx(summary["val_nll"], rel=1e-12)
    assert "in the data file's units" in summary["nll_unit"] and "history" in summary["nll_unit"]

    # eval DIR --data new.csv: every row scored; log p(x) per row against a finite-difference Jacobian of x → z
    new = table(7, seed=9)
    write_csv(tmp_path / "new.csv", new)
    assert main(["eval", str(out), "--data", str(tmp_path / "new.csv"), "--out", str(tmp_path / "scores.npy")]) == 0
    scores = np.load(tmp_path / "scores.npy")
    np.testing.assert_array_equal(scores, model.log_prob(new))  # the CLI and Python: one path
    np.testing.assert_allclose(scores, numerical_log_density(inner, mean, std, new), rtol=0, atol=1e-6)
    assert f"NLL {-scores.mean():.4f} nats on new.csv (7 rows)" in capsys.readouterr().out
    in_model_units = inner.log_prob((new - mean) / std)
    assert np.abs(scores - in_model_units).min() > 1  # the units matter: the spreads are far from 1

    # sample: x = μ + σ ⊙ u, in the file's units
    assert main(["sample", str(out), "-n", "4000", "--seed", "4", "--out", str(tmp_path / "s.npy")]) == 0
    samples = np.load(tmp_path / "s.npy")
    np.testing.assert_array_equal(samples, model.sample(4000, np.random.default_rng(4)))
    np.testing.assert_array_equal(samples, mean + std * inner.sample(4000, np.random.default_rng(4)))
    assert (np.abs(samples.mean(axis=0) - prepared.raw.train.mean(axis=0)) < prepared.standardization.std).all()
    assert main(["sample", str(out), "-n", "3", "--out", str(tmp_path / "s.csv")]) == 0
    assert (tmp_path / "s.csv").read_text().splitlines()[0] == "height,temp,rate"  # the file's own names


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_load_model_from_python_works_in_the_files_units(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        dtype: str) -> None:
    """What a user of the library expects of a folder ``nflow train --data FILE`` wrote: ``load_model`` gives a
    model of the file's rows, whose ``log_prob`` is the CLI's score of each row and whose samples look like
    the data, in its units (on main before the Standardize layer it was the model of the standardised rows)."""
    x = table(800, seed=5)
    data = write_csv(tmp_path / "my.csv", x)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), *TINY, "--dtype", dtype, "--out", str(out)]) == 0
    prepared = prepare_data(data, seed=0, dtype=dtype)
    model = load_model(out)
    assert model.dtype == dtype and model.dim == 3
    rows = x.astype(dtype)
    assert main(["eval", str(out), "--data", str(data), "--out", str(tmp_path / "scores.npy")]) == 0
    np.testing.assert_array_equal(model.log_prob(rows).astype(np.float64), np.load(tmp_path / "scores.npy"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_nll"] == evaluate_nll(model, prepared.raw.test.astype(dtype))  # nflow eval DIR's number
    np.testing.assert_allclose(model.decode(model.encode(rows)), rows, rtol=1e-5 if dtype == "float32" else 1e-12)
    samples = model.sample(20000, np.random.default_rng(1)).astype(np.float64)
    std = x.std(axis=0)
    assert (np.abs(samples.mean(axis=0) - x.mean(axis=0)) < 0.2 * std).all(), (samples.mean(axis=0), x.mean(axis=0))
    assert ((samples.std(axis=0) > 0.7 * std) & (samples.std(axis=0) < 1.4 * std)).all(), (samples.std(axis=0), std)
    # a record that disagrees with the layer is two models' files: refused, not guessed between
    config = json.loads((out / "model.json").read_text())
    config["metadata"]["standardization"]["mean"][1] += 1.0
    (out / "model.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"metadata.standardization.mean differs from the mean of the model's "
                                             r"Standardize layer"):
        load_model(out)
    capsys.readouterr()
    assert main(["eval", str(out)]) == 2
    assert "differs from the mean of the model's Standardize layer" in capsys.readouterr().err


def test_a_2d_data_files_plots_are_drawn_in_its_units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """density.png and samples.png of a data file: its own rows (not the standardised ones), the model saved, its
    column names on the axes, and no equal aspect (the columns are in different units)."""
    from nflow_np import plots

    drawn = []

    def record(name: str):
        def draw(model, data, path, **style):
            drawn.append((name, model, data, style))
            Path(path).write_bytes(b"picture")
            return Path(path)
        return draw

    monkeypatch.setattr(plots, "plot_density", record("density"))
    monkeypatch.setattr(plots, "plot_samples", record("samples"))
    data = write_csv(tmp_path / "two.csv", table(300)[:, :2], header="height,temp")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), *TINY[:-1], "--out", str(out)]) == 0
    prepared = prepare_data(data, seed=0)
    assert [name for name, *_ in drawn] == ["density", "samples"]
    for _, model, rows, style in drawn:
        np.testing.assert_array_equal(rows, prepared.raw.test)
        assert type(model.flow[0]) is Standardize
        assert (style["labels"], style["equal_aspect"]) == (("height", "temp"), False)
    assert (out / "density.png").read_bytes() == b"picture"


def test_npy_and_npz_files_and_the_array_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    x = table(300).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "one.npz", rows=x)
    np.savez(tmp_path / "two.npz", train=x, other=x[:, :2])
    one = ["--epochs", "1", *TINY[2:], "--dtype", "float32"]
    assert main(["train", "--data", str(tmp_path / "x.npy"), *one, "--out", str(tmp_path / "a")]) == 0
    assert main(["train", "--data", str(tmp_path / "one.npz"), *one, "--out", str(tmp_path / "b")]) == 0
    assert main(["train", "--data", f"{tmp_path / 'two.npz'}:other", *one, "--out", str(tmp_path / "c")]) == 0
    for run, dim in (("a", 3), ("b", 3), ("c", 2)):
        model = load_model(tmp_path / run)
        assert (model.dim, model.dtype) == (dim, np.float32)
    # the same rows (the same seed, the same split), whichever container held them
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert read_config(tmp_path / "c")["metadata"]["data_file"]["array"] == "other"
    assert main(["train", "--data", str(tmp_path / "two.npz"), *one, "--out", str(tmp_path / "d")]) == 2
    assert "holds the arrays ['other', 'train']; name one" in capsys.readouterr().err


def test_a_mixture_on_a_data_file_is_saved_in_its_units(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_csv(tmp_path / "my.csv", table(500), header=None, delimiter=";")
    out = tmp_path / "gmm"
    assert main(["train", "--model", "gmm", "--data", str(data), "--components", "1,3", "--out", str(out)]) == 0
    mixture, summary = GaussianMixture.load(out)
    prepared = prepare_data(data, seed=0)
    # after an M-step Σ_k π_k m_k is the mean of the rows EM saw (0 on the standardised rows): mapped back to the
    # file's units it must be the training split's mean, whatever the rescaling formula says (docs/data.md)
    error = mixture.weights @ mixture.means - prepared.raw.train.mean(axis=0)
    assert (np.abs(error) < 1e-9 * prepared.standardization.std).all(), error
    assert summary["n_test"] == 50 and summary["data_file"]["columns"] is None
    assert summary["test_nll"] == mixture.nll(prepared.raw.test)
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert f"test NLL {summary['test_nll']:.4f} nats on my.csv (its 50 test rows, seed 0)" in capsys.readouterr().out
    new = write_csv(tmp_path / "new.csv", table(9, seed=2), header=None)
    assert main(["eval", str(out), "--data", str(new), "--out", str(tmp_path / "scores.csv")]) == 0
    scores = np.loadtxt(tmp_path / "scores.csv", delimiter=",", skiprows=1)
    np.testing.assert_array_equal(scores, mixture.log_prob(table(9, seed=2)))
    assert main(["sample", str(out), "-n", "3000", "--out", str(tmp_path / "s.npy")]) == 0
    samples = np.load(tmp_path / "s.npy")
    assert (np.abs(samples.mean(axis=0) - prepared.raw.train.mean(axis=0)) < 0.2 * prepared.standardization.std).all()


def test_a_constant_column_is_left_unscaled_and_said_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    x = table(300)
    x[:, 1] = 7.0
    data = write_csv(tmp_path / "c.csv", x)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--epochs", "1", *TINY[2:], "--out", str(out)]) == 0
    error = capsys.readouterr().err
    assert "column(s) 1 ('temp') hold one value in the training split: left unscaled (std 1" in error
    record = read_config(out)["metadata"]["standardization"]
    assert record["std"][1] == 1.0 and record["mean"][1] == 7.0
    assert np.isfinite(json.loads((out / "summary.json").read_text())["test_nll"])


def test_float32_runs_name_the_columns_float32_resolves_coarsely(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A timestamp-like column (values near 1e9, spread 10): float32 holds it to 64 units, 6 standard deviations.
    The flow trains on float64-standardised rows, but the model saved takes the file's rows in float32: said so."""
    x = table(300)
    x[:, 0] += 1e9
    data = write_csv(tmp_path / "t.csv", x)
    assert main(["train", "--data", str(data), "--epochs", "1", *TINY[2:], "--dtype", "float32",
                 "--out", str(tmp_path / "a")]) == 0
    error = capsys.readouterr().err
    assert "float32 resolves the values of column(s) 0 ('height'): 6" in error and "train in float64" in error
    assert "'temp'" not in error and "'rate'" not in error  # 100 ± 10 and 0.003 ± 0.001 are fine in float32
    assert main(["train", "--data", str(data), "--epochs", "1", *TINY[2:], "--out", str(tmp_path / "b")]) == 0
    assert "resolves" not in capsys.readouterr().err  # float64: 2.4e-7 units, far below a standard deviation


def test_a_folder_of_the_metadata_only_standardisation_evals_and_samples_as_before(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Folders written by main at 833bd37 (tests/fixtures/cli_data_file_metadata_only/make.py) held the flow of the
    standardised rows and the record beside it; nflow eval and sample added −Σ log σ and μ + σ ⊙ u by hand. Now
    load_model puts the Standardize layer in front, and the CLI gives the numbers that code gave."""
    folder = FIXTURES / "cli_data_file_metadata_only"
    assert main(["eval", str(folder), "--data", str(folder / "points.csv"), "--out", str(tmp_path / "lp.npy")]) == 0
    expected = np.load(folder / "expected_log_prob.npy")
    np.testing.assert_allclose(np.load(tmp_path / "lp.npy"), expected, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(np.load(tmp_path / "lp.npy"), load_model(folder).log_prob(
        np.loadtxt(folder / "points.csv", delimiter=",", skiprows=1)))
    assert f"NLL {-expected.mean():.4f} nats on points.csv (7 rows)" in capsys.readouterr().out
    assert main(["sample", str(folder), "-n", "50", "--seed", "3", "--out", str(tmp_path / "s.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), np.load(folder / "expected_samples.npy"))


@pytest.fixture(scope="module")
def moons(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model of the built-in two_moons (dimension 2)."""
    out = tmp_path_factory.mktemp("moons") / "run"
    assert main(["train", "--n-train", "256", "--n-val", "64", "--n-test", "64", *TINY, "--out", str(out)]) == 0
    return out


def test_bad_data_files_and_split_options_are_one_line_errors(tmp_path: Path, moons: Path) -> None:
    good = write_csv(tmp_path / "good.csv", table(40))
    (tmp_path / "names.csv").write_text("x,name\n1,a\n2,b\n3,c\n")
    (tmp_path / "nan.csv").write_text("x,y\n1,2\n3,nan\n5,6\n")
    np.savez(tmp_path / "two.npz", a=np.ones((4, 2)), b=np.ones((4, 2)))
    huge = table(40)
    huge[5, 0] = 1e39  # float64 holds it; float32, which the saved model would take it in, does not
    write_csv(tmp_path / "huge.csv", huge)
    out = ["--out", str(tmp_path / "run")]
    cases = [
        (["--data", str(tmp_path / "names.csv")], ["column 1 ('name') is not numeric: 'a' at line 2"]),
        (["--data", str(tmp_path / "nan.csv")], ["non-finite value nan at row 1, column 1 ('y')"]),
        (["--data", str(tmp_path / "missing.csv")], ["missing.csv: no such file"]),
        (["--data", str(tmp_path / "two.npz")], ["holds the arrays ['a', 'b']; name one", "--data FILE:NAME"]),
        (["--data", f"{tmp_path / 'two.npz'}:c"], ["no array 'c'"]),
        (["--data", "no_such_set"], ["invalid choice: 'no_such_set'", "FILE.csv"]),
        (["--data", str(good), "--val-fraction", "1.5"], ["--val-fraction: expected a number between 0 and 1"]),
        (["--data", str(good), "--test-fraction", "0"], ["--test-fraction: expected a number between 0 and 1"]),
        (["--data", str(good), "--val-fraction", "0.5", "--test-fraction", "0.5"], ["their sum must be below 1"]),
        (["--data", str(good), "--val-fraction", "0.5", "--test-fraction", "0.46"],
         ["40 rows are too few", "leave 1, at least 2 needed"]),
        (["--data", str(good), "--n-train", "100"], ["--n-train does not apply: a data file", "--val-fraction"]),
        (["--val-fraction", "0.2"], ["--val-fraction does not apply", "two_moons is a built-in data set"]),
        (["--data", str(good), "--batch-size", "1000"], ["--batch-size 1000 exceeds the 32 training rows of good.csv"]),
        (["--data", str(tmp_path / "huge.csv"), "--dtype", "float32"],
         ["row 5, column 0 ('height') (value 1e+39", "overflows float32", "train in float64"]),
    ]
    for argv, fragments in cases:
        assert_one_line_error(nflow("train", *argv, *out), *fragments)
        assert not (tmp_path / "run" / "model.json").exists()
    np.savetxt(tmp_path / "one.csv", table(30)[:, :1])
    assert_one_line_error(nflow("train", "--data", str(tmp_path / "one.csv"), *out),
                          "has one column: a coupling flow needs at least 2", "--model gmm")
    assert_one_line_error(nflow("eval", str(moons), "--data", str(good)),
                          "good.csv has 3 columns but the model in", "has dimension 2")
    assert_one_line_error(nflow("eval", str(moons), "--data", str(good), "--seed", "1"), "--seed: not for a data file")
    assert_one_line_error(nflow("eval", str(moons), "--out", str(tmp_path / "x.txt")), "--out must end in .npy or .csv")


def test_a_data_file_run_resumes_from_anywhere_and_notices_a_changed_file(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture) -> None:
    work = tmp_path / "work"
    work.mkdir()
    write_csv(work / "my.csv", table(400))  # 320 training rows: 5 steps of 64 per epoch, 10 in all
    reference = tmp_path / "reference"
    assert main(["train", "--data", str(work / "my.csv"), *TINY, "--out", str(reference)]) == 0
    monkeypatch.chdir(work)
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 8)
        with pytest.raises(Interrupted):  # a relative path, recorded resolved
            main(["train", "--data", "my.csv", *TINY, "--checkpoint-every", "3", "--out", str(tmp_path / "run")])
    monkeypatch.chdir(tmp_path)  # resumed from elsewhere: the recorded file is found, the run ends bit for bit
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-000000006.npz")
    assert (reference / "model.safetensors").read_bytes() == (tmp_path / "run" / "model.safetensors").read_bytes()

    write_csv(work / "my.csv", table(400, seed=1))  # the file changes under the run
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run")]) == 2
    assert "my.csv changed since the model in" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "3", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("nflow train: error:") and error.count("\n") == 1 and "train: the data differ" in error
    (work / "my.csv").unlink()
    assert main(["eval", str(tmp_path / "run")]) == 2
    assert "cannot be read now" in capsys.readouterr().err


def test_old_model_folders_eval_and_sample_as_before(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "old"
    shutil.copytree(FIXTURES / "cli_realnvp_checkpointed", folder)
    model = load_model(folder)
    metadata = read_config(folder)["metadata"]
    assert "standardization" not in metadata
    assert main(["sample", str(folder), "-n", "20", "--seed", "3", "--out", str(tmp_path / "s.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), model.sample(20, np.random.default_rng(3)))
    capsys.readouterr()
    assert main(["eval", str(folder), "--out", str(tmp_path / "lp.npy")]) == 0
    test = load_toy(metadata["data"], n_train=1, n_val=1, n_test=metadata["n_test"], seed=metadata["seed"],
                    dtype=model.dtype).test
    assert f"test NLL {evaluate_nll(model, test):.4f} nats on {metadata['data']}" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(tmp_path / "lp.npy"), model.log_prob(test))


def test_an_image_runs_model_summary_and_pictures_are_one_publish(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14: the model was published, then summary.json and the pictures written one by one; a kill
    between left the new model beside the previous run's summary. Here the process "dies" right after the
    folder swap: what it left must be one run's files."""
    from nflow_np.files import folders

    out = tmp_path / "run"
    argv = ["train", "--data", "digits", "--model", "nice", "--hidden", "8", "--epochs", "1", "--batch-size", "256",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    before = {name: (out / name).read_bytes() for name in ("summary.json", "samples.png")}
    real = folders.exchange

    class Died(Exception):
        """Stands in for SIGKILL: nothing after the swap runs."""

    def exchange_then_die(a: Path, b: Path) -> bool:
        swapped = real(a, b)
        if swapped and str(b) == os.path.abspath(out):
            raise Died
        return swapped

    monkeypatch.setattr(folders, "exchange", exchange_then_die)
    with pytest.raises(Died):
        main([*argv, "--seed", "1", "--force"])
    summary, config = json.loads((out / "summary.json").read_text()), read_config(out)
    assert summary["model_sha256"] == config["sha256"]
    assert summary["settings"]["seed"] == config["metadata"]["seed"] == 1
    assert (out / "summary.json").read_bytes() != before["summary.json"]
    assert (out / "samples.png").read_bytes() != before["samples.png"]  # the new model's pictures, already there
