"""Damaged and hostile model files and checkpoints: every outcome is a clean load or ModelFileError.

The fuzz tests mutate the bytes of real files (flips, overwrites, insertions, deletions,
truncations, splices of the other file) and call the loader; anything but a load that returns the
original parameters or a :class:`~nflow_np.io.ModelFileError` fails. The hand-written cases are the
attacks the format is designed against: absurd sizes, object arrays, unknown kinds, deep nesting,
decompression bombs and links out of the folder.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import to_format_1
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nflow_np.architectures import build_model
from nflow_np.checkpoint import CheckpointError, TrainState, load_checkpoint, save_checkpoint
from nflow_np.io import CONFIG_FILE, MAX_DIM, NPZ_WEIGHTS_FILE, WEIGHTS_FILE, ModelFileError, load_model, save_model
from nflow_np.optim import Adam

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
POINTS = np.random.default_rng(0).normal(size=(16, 2))


def _model_files(folder: Path, weights: str) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (CONFIG_FILE, weights)}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    model = build_model("nice", 2, layers=2, hidden=(3,), seed=2)
    for _, value, _ in model.named_parameters():
        value[...] = np.random.default_rng(1).normal(0.0, 0.3, value.shape)
    folder = save_model(model, tmp_path_factory.mktemp("model"), metadata={"note": "fuzz"})
    return _model_files(folder, WEIGHTS_FILE), model.state_dict()


@pytest.fixture(scope="module")
def old_model_files(tmp_path_factory, model_files) -> dict[str, bytes]:
    """The same model as format 1 (``model.npz``) wrote it: the old reader is fuzzed too."""
    folder = tmp_path_factory.mktemp("old")
    for name, content in model_files[0].items():
        (folder / name).write_bytes(content)
    return _model_files(to_format_1(folder), NPZ_WEIGHTS_FILE)


@st.composite
def mutated(draw: st.DrawFn, original: bytes, other: bytes) -> bytes:
    """``original`` after one to four random edits."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate", "splice"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            data[at : at + 4] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del data[at:]
        else:  # a piece of the other file, as from a save interleaved with another
            start = draw(st.integers(0, len(other) - 1))
            data[at : at + 32] = other[start : start + 32]
    return bytes(data)


def load_cleanly_or_refuse(folder: Path, original: dict[str, np.ndarray]) -> bool:
    """Load ``folder``; True if it loaded (then it must be the original model), False if refused."""
    try:
        model = load_model(folder)
    except ModelFileError:
        return False
    state = model.state_dict()
    assert state.keys() == original.keys()
    for name, value in original.items():
        np.testing.assert_array_equal(state[name], value)  # the checksum admits no other weights
    assert np.isfinite(model.log_prob(POINTS)).all()
    return True


@FUZZ
@given(data=st.data(), target=st.sampled_from(["config", "weights", "both"]), old=st.booleans())
def test_mutated_model_files_load_cleanly_or_raise_model_file_error(
    tmp_path, model_files, old_model_files, data, target, old
):
    files, original = model_files
    files = old_model_files if old else files
    weights = NPZ_WEIGHTS_FILE if old else WEIGHTS_FILE
    folder = tmp_path / "m"
    folder.mkdir(exist_ok=True)
    for stale in (WEIGHTS_FILE, NPZ_WEIGHTS_FILE):
        (folder / stale).unlink(missing_ok=True)
    for name, content in files.items():
        if target in ("config" if name == CONFIG_FILE else "weights", "both"):
            other = files[weights if name == CONFIG_FILE else CONFIG_FILE]
            content = data.draw(mutated(content, other), label=name)
        (folder / name).write_bytes(content)
    load_cleanly_or_refuse(folder, original)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 12)
    | st.sampled_from([2**31, 2**53 + 1, 10**12, 10**100, -(10**12)])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(
        ["relu", "tanh", "affine_coupling", "reverse", "sequential", "float32", "logistic", "", "x" * 99]
    ),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["kind", "dim", "flows", "mask"]), inner)
    ),
    max_leaves=8,
)


@st.composite
def edited_config(draw: st.DrawFn, text: bytes) -> bytes:
    """Valid JSON with one to three values replaced, keys deleted or keys added: shapes a parser cannot catch."""
    config = json.loads(text)
    for _ in range(draw(st.integers(1, 3))):
        parent, key = None, None
        node = config
        while isinstance(node, dict | list) and node and draw(st.booleans()):
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            parent, key = node, draw(st.sampled_from(keys))
            node = node[key]
        if parent is None:
            parent, key = config, draw(st.sampled_from(list(config)))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "kind", "dim", "hidden"]))] = draw(JSON_VALUES)
        else:
            parent[key] = draw(JSON_VALUES)
    return json.dumps(config).encode()


@FUZZ
@given(data=st.data())
def test_edited_configs_load_cleanly_or_raise_model_file_error(tmp_path, model_files, data):
    files, original = model_files
    folder = tmp_path / "m"
    folder.mkdir(exist_ok=True)
    (folder / CONFIG_FILE).write_bytes(data.draw(edited_config(files[CONFIG_FILE])))
    (folder / WEIGHTS_FILE).write_bytes(files[WEIGHTS_FILE])
    load_cleanly_or_refuse(folder, original)


def test_harmless_edits_still_load(tmp_path, model_files):
    files, original = model_files
    config = json.loads(files[CONFIG_FILE])
    config["metadata"] = {"edited": True}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))  # other whitespace, other metadata
    (tmp_path / WEIGHTS_FILE).write_bytes(files[WEIGHTS_FILE])
    assert load_cleanly_or_refuse(tmp_path, original)


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    model = build_model("realnvp", 2, layers=1, hidden=(3,), seed=2)
    optimizer = Adam(model)
    state = TrainState(best_params=model.state_dict(), rng=np.random.default_rng(0).bit_generator.state)
    path = save_checkpoint(
        tmp_path_factory.mktemp("ckpt"), model, optimizer, state, {"epochs": 1}, lr=1e-3, backend="numpy"
    )
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_mutated_checkpoints_load_cleanly_or_raise_checkpoint_error(tmp_path, checkpoint_file, data):
    path = tmp_path / "checkpoint-000000000.npz"
    path.write_bytes(data.draw(mutated(checkpoint_file, checkpoint_file)))
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError:
        return
    assert checkpoint.state.rng == np.random.default_rng(0).bit_generator.state
    assert np.isfinite(checkpoint.model.log_prob(POINTS)).all()


# -- hostile files, by hand --------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    save_model(build_model("realnvp", 2, layers=2, hidden=(4,)), tmp_path)
    return tmp_path


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    change(config)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("hidden", "message"),
    [
        ([10**6, 10**6], "the flow needs more than"),  # 10^12 parameters: 8 TB, refused before allocating
        ([30000, 30000], "the flow needs more than"),  # 7 GB: would be allocated by a naive loader
        ([10**30], "the flow needs more than"),
    ],
)
def test_absurd_sizes_are_refused_before_allocating(saved, hidden, message):
    edit_config(saved, lambda config: config["flow"]["flows"][0].update(hidden=hidden))
    with pytest.raises(ModelFileError, match=message):
        load_model(saved)


def test_absurd_dimensions_are_refused(saved):
    edit_config(saved, lambda config: config.update(dim=10**12, flow={"kind": "reverse", "dim": 10**12}))
    with pytest.raises(ModelFileError, match=f"above the largest supported value {MAX_DIM}"):
        load_model(saved)


@pytest.mark.parametrize(("depth", "message"), [(100_000, "invalid JSON"), (200, "nested deeper than 64 levels")])
def test_deeply_nested_specs_are_refused(saved, depth, message):
    config = json.loads((saved / CONFIG_FILE).read_text())
    config["flow"] = "PLACEHOLDER"
    nested = '{"kind": "inverse", "flow": ' * depth + '{"kind": "reverse", "dim": 2}' + "}" * depth
    (saved / CONFIG_FILE).write_text(json.dumps(config).replace('"PLACEHOLDER"', nested))
    with pytest.raises(ModelFileError, match=message):
        load_model(saved)


def rewrite_archive(folder: Path, members: dict[str, bytes], compress: bool = False) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    (folder / NPZ_WEIGHTS_FILE).write_bytes(buffer.getvalue())


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def real_members(folder: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(folder / NPZ_WEIGHTS_FILE) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


@pytest.fixture
def saved_npz(saved: Path) -> Path:
    """A format-1 folder (``model.npz``): the archive attacks below target the old reader, still in use."""
    return to_format_1(saved)


def test_a_decompression_bomb_is_refused_before_it_is_inflated(saved_npz):
    saved = saved_npz
    members = real_members(saved)
    members["flow.0.scale.npy"] = npy(np.zeros(50_000_000 // 8))  # 50 MB of zeros, ~50 kB compressed
    rewrite_archive(saved, members, compress=True)
    assert (saved / NPZ_WEIGHTS_FILE).stat().st_size < 1_000_000
    with pytest.raises(ModelFileError, match=r"'flow\.0\.scale' declares 50000128 bytes"):
        load_model(saved)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("flow.0.scale.npy", npy(np.array([{"os": "system"}], dtype=object)), "Object arrays cannot be loaded"),
        ("../../outside.npy", npy(np.ones(1)), r"unexpected \['\.\./\.\./outside'\]"),
        ("flow.0.scale", b"no npy suffix", "is not one .npy array"),
        ("flow.0.scale.npy", b"\x93NUMPY\x01\x00garbage", "cannot be read"),
    ],
    ids=["object-array", "path-outside", "not-npy", "bad-header"],
)
def test_hostile_archive_members_are_refused(saved_npz, name, content, message):
    saved = saved_npz
    members = real_members(saved)
    members[name] = content
    rewrite_archive(saved, members)
    with pytest.raises(ModelFileError, match=message):
        load_model(saved)


def test_duplicate_archive_members_are_refused(saved_npz):
    saved = saved_npz
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in real_members(saved).items():
            archive.writestr(name, content)
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("flow.0.scale.npy", npy(np.zeros(1)))
    (saved / NPZ_WEIGHTS_FILE).write_bytes(buffer.getvalue())
    with pytest.raises(ModelFileError, match="is not one .npy array"):
        load_model(saved)


@pytest.mark.parametrize("name", [WEIGHTS_FILE, CONFIG_FILE])
def test_links_out_of_the_folder_are_refused(saved, tmp_path_factory, name):
    elsewhere = tmp_path_factory.mktemp("elsewhere") / name
    (saved / name).replace(elsewhere)  # the real file, now outside the folder
    (saved / name).symlink_to(elsewhere)
    with pytest.raises(ModelFileError, match="is a symbolic link"):
        load_model(saved)


def test_special_files_are_refused(saved):
    (saved / WEIGHTS_FILE).unlink()
    os.mkfifo(saved / WEIGHTS_FILE)  # reading it naively would block forever
    with pytest.raises(ModelFileError, match="not a regular file"):
        load_model(saved)
    (saved / WEIGHTS_FILE).unlink()
    (saved / WEIGHTS_FILE).mkdir()
    with pytest.raises(ModelFileError, match="not a regular file"):
        load_model(saved)


def test_an_oversized_config_is_refused_unread(saved, monkeypatch):
    import nflow_np.files.safe

    monkeypatch.setattr(nflow_np.files.safe, "MAX_CONFIG_BYTES", 100)
    with pytest.raises(ModelFileError, match="more than the 100 this loader reads"):
        load_model(saved)


# -- the Gaussian-mixture folder gets the same protections (issue 14) -------------------------------
@pytest.fixture
def gmm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nflow_np.gmm import GaussianMixture

    mixture = GaussianMixture(2, seed=0).fit(POINTS)
    return mixture.save(tmp_path_factory.mktemp("gmm"), {"data": "two_moons", "seed": 1, "n_test": 8, "components": 2})


def load_gmm_folder(folder: Path):
    from nflow_np.gmm import GaussianMixture

    return GaussianMixture.load(folder)


@pytest.mark.parametrize("name", ["gmm.npz", "summary.json"])
def test_gmm_special_files_and_links_are_refused(gmm_folder, tmp_path_factory, name):
    elsewhere = tmp_path_factory.mktemp("elsewhere") / name
    (gmm_folder / name).replace(elsewhere)
    (gmm_folder / name).symlink_to(elsewhere)
    with pytest.raises(ModelFileError, match="is a symbolic link"):
        load_gmm_folder(gmm_folder)
    (gmm_folder / name).unlink()
    os.mkfifo(gmm_folder / name)  # reading it naively would block forever
    with pytest.raises(ModelFileError, match="not a regular file"):
        load_gmm_folder(gmm_folder)


@pytest.mark.parametrize(
    ("summary", "message"),
    [
        ('{"a": ' * 200 + "1" + "}" * 200, "nested deeper than 64 levels"),
        ("[" * 100_000 + "]" * 100_000, "invalid JSON"),
        ('{"seed": "abc"}', "seed: expected an integer"),
        ('{"n_test": 1.5}', "n_test: expected an integer"),
        ('{"data": ["two_moons"]}', "data must be a string"),
        ('{"components": 3}', "components is 3 but gmm.npz holds 2"),
        ("[1]", "expected a JSON object"),
    ],
)
def test_gmm_hostile_summaries_are_refused(gmm_folder, summary, message):
    (gmm_folder / "summary.json").write_text(summary)
    with pytest.raises(ModelFileError, match=message):
        load_gmm_folder(gmm_folder)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"weights": np.full(2, 0.5), "means": np.zeros((2, 2))}, "expected"),
        ({"weights": np.full(2, 0.5), "means": np.zeros((2, 2)), "covariances": np.zeros((2, 3, 3))}, "fit together"),
        ({"weights": np.full(2, 0.5), "means": np.zeros((2, 2)), "covariances": np.zeros((2, 2, 2))}, "positive def"),
        ({"weights": np.ones(2, np.float32), "means": np.zeros((2, 2)), "covariances": np.ones((2, 2, 2))}, "dtype"),
    ],
)
def test_gmm_wrong_arrays_are_refused(gmm_folder, members, message):
    np.savez(gmm_folder / "gmm.npz", **members)
    with pytest.raises(ModelFileError, match=message):
        load_gmm_folder(gmm_folder)


def test_gmm_decompression_bomb_and_object_arrays_are_refused(gmm_folder):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("weights.npy", npy(np.full(2, 0.5)))
        archive.writestr("means.npy", npy(np.zeros((2, 2))))
        archive.writestr("covariances.npy", npy(np.zeros((2, 2, 2))) + b"\0" * 50_000_000)  # 50 MB of padding
    (gmm_folder / "gmm.npz").write_bytes(buffer.getvalue())
    with pytest.raises(ModelFileError, match=r"'covariances' declares \d+ bytes"):
        load_gmm_folder(gmm_folder)
    np.savez(gmm_folder / "gmm.npz", weights=np.array([{"a": 1}], dtype=object), means=np.zeros((1, 2)))
    with pytest.raises(ModelFileError):
        load_gmm_folder(gmm_folder)


@FUZZ
@given(data=st.data(), target=st.sampled_from(["gmm.npz", "summary.json"]))
def test_mutated_gmm_folders_load_cleanly_or_raise_model_file_error(gmm_folder, data, target):
    original = {name: (gmm_folder / name).read_bytes() for name in ("gmm.npz", "summary.json")}
    other = original["summary.json" if target == "gmm.npz" else "gmm.npz"]
    (gmm_folder / target).write_bytes(data.draw(mutated(original[target], other)))
    try:
        loaded, summary = load_gmm_folder(gmm_folder)
        assert isinstance(summary, dict)
        assert np.isfinite(loaded.log_prob(POINTS)).all()
    except ModelFileError:
        pass
    finally:
        for name, content in original.items():
            (gmm_folder / name).write_bytes(content)
