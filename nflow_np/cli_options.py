"""Which ``nflow train`` options apply to which run, the defaults that really apply there, and the refusals.

Three kinds of run take different options: a flow on toy data or a data file, a flow on images
(``--data digits|mnist``, :data:`~nflow_np.image_training.IMAGE_RECIPES`) and the EM baseline
(``--model gmm``); a data file (``--data FILE``, for a flow or the mixture) is split by ``--val-fraction``
and ``--test-fraction`` where a built-in data set is sized by ``--n-train``/``--n-val``/``--n-test``. The
parser gives every ``train`` option the default :data:`argparse.SUPPRESS`, so the namespace it returns
holds exactly the options typed on the command line (``given``), never a default that happens to equal
what was typed. :func:`resolve_train` then fills in the defaults of the
chosen kind and refuses, with the reason, every given option that the kind would not honour.
:func:`resumed_options` does the same for ``--resume``: the recorded options, and what may change.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from nflow_np.checkpoint import CheckpointError, latest_checkpoint
from nflow_np.data.files import is_data_file
from nflow_np.data.images import IMAGE_DATASETS
from nflow_np.density import CHECKPOINT_DIR
from nflow_np.train import fit

_FIT = {name: p.default for name, p in inspect.signature(fit).parameters.items()}

TRAIN_DEFAULTS: dict[str, object] = {
    "data": "two_moons",
    "model": "realnvp",
    "layers": 8,
    "hidden": (64, 64),
    "activation": "relu",
    "epochs": 100,
    "batch_size": 256,
    "lr": 2e-3,
    "lr_schedule": "cosine",
    "patience": 20,
    "clip_norm": None,
    "dtype": "float64",
    "seed": 0,
    "n_train": 15000,
    "n_val": 5000,
    "n_test": 5000,
    "out": None,
    "progress": True,
    "plots": True,
    "checkpoint_every": 0,
    "resume": None,
    "skip_nonfinite": False,
    "memory": "store",
    "anchor_every": None,
    "force": False,
}
"""Every default of ``nflow train`` on toy data. ``out`` None: ``runs/<data>-<model>``; ``patience`` 0:
no early stopping; ``clip_norm`` None: no clipping; ``anchor_every`` None: chosen (docs/memory.md)."""
if "time_limit" in _FIT:  # fit's wall-clock budget, where this version of fit has one
    TRAIN_DEFAULTS["time_limit"] = None

GMM_DEFAULTS: dict[str, object] = {
    key: TRAIN_DEFAULTS[key] for key in ("data", "seed", "n_train", "n_val", "n_test", "out", "progress", "plots")
} | {"model": "gmm", "components": (1, 2, 4, 8, 16, 32), "reg_covar": 1e-6, "force": False}
"""``nflow train --model gmm``: EM has no layers, epochs or learning rate (``progress``/``plots``: it shows
no bar and draws nothing, so hiding them is honoured as it stands)."""

FILE_DEFAULTS: dict[str, object] = {"val_fraction": 0.1, "test_fraction": 0.1}
"""A data file's splits (``--data FILE``): shares of its rows held out, seeded by ``--seed``. They replace the
built-in data sets' ``--n-train``/``--n-val``/``--n-test``."""
SIZES = ("n_train", "n_val", "n_test")
"""How many points a built-in data set draws (a data file has the rows it has)."""

_IMAGE_COMMON = {"seed": 0, "dtype": "float32", "lr_schedule": "cosine", "out": None, "progress": True,
                 "memory": "store", "anchor_every": None, "force": False, "checkpoint_every": 0, "resume": None}
"""The options every image run takes (``checkpoint_every``: in epochs; 0: none, or a resumed run's final one)."""


NETS = ("mlp", "resnet")
"""RealNVP's coupling nets on images (``--net``): MLPs, or the paper's convolutional ResNets (docs/conv.md)."""
NET_OPTIONS = {"mlp": ("hidden",), "resnet": ("channels", "blocks")}
"""The options that size each kind of coupling net."""


def image_model_name(model: str, net: str | None = None) -> str:
    """The :data:`~nflow_np.image_training.IMAGE_RECIPES` key of an image run: ``"realnvp_resnet"`` for
    ``--model realnvp --net resnet``, else ``model``."""
    return "realnvp_resnet" if model == "realnvp" and net == "resnet" else model


def image_defaults(data: str, model: str, net: str | None = None) -> dict[str, object]:
    """The defaults of an image run: the recipe of ``(data, model)`` (``net`` ``"resnet"``: of RealNVP with
    convolutional couplings) and the settings every image run shares."""
    from nflow_np.image_training import IMAGE_RECIPES

    name = image_model_name(model, net)
    recipe = IMAGE_RECIPES[(data, name)]
    sizes = NET_OPTIONS["resnet" if name == "realnvp_resnet" else "mlp"]
    keys = (*sizes, "epochs", "batch_size", "lr", "patience", "weight_decay", "time_limit", "alpha")
    chosen = {key: recipe[key] for key in keys}
    chosen["patience"] = chosen["patience"] or 0  # the command line's 0 is the recipe's None: never stop early
    nets = {"net": net or "mlp"} if model == "realnvp" else {}  # NICE's nets are MLPs, no choice
    return {"data": data, "model": model} | nets | chosen | _IMAGE_COMMON


def run_kind(data: str, model: str) -> str:
    """``"gmm"``, ``"image"`` or ``"toy"`` (toy also covers a user's data file)."""
    if model == "gmm":
        return "gmm"
    return "image" if data in IMAGE_DATASETS else "toy"


def defaults_for(data: str, model: str, net: str | None = None) -> dict[str, object]:
    """Every option the run of ``data`` and ``model`` (and ``--net``) honours, with the value it takes when not
    given."""
    kind = run_kind(data, model)
    if kind == "image":
        return image_defaults(data, model, net)
    defaults = dict(GMM_DEFAULTS) if kind == "gmm" else dict(TRAIN_DEFAULTS) | {"model": model}
    if is_data_file(data):  # the file's rows, split by fractions
        defaults = {key: value for key, value in defaults.items() if key not in SIZES} | FILE_DEFAULTS
    return defaults | {"data": data}


def refuse_sizes(given: dict[str, object], data: str) -> None:
    """Raise ``ValueError`` for ``--n-train``/``--n-val``/``--n-test`` with a data file, or ``--val-fraction``/
    ``--test-fraction`` without one: each names the other's options."""
    if is_data_file(data):
        refused = [name for name in given if name in SIZES]
        why = (f"a data file ({data}) has the rows it has: --val-fraction and --test-fraction (default 0.1 each) "
               "choose how many are held out")
    else:
        refused = [name for name in given if name in FILE_DEFAULTS]
        why = (f"they split a data file (--data FILE.csv, .npy or .npz); {data} is a built-in data set, sized by "
               "--n-train, --n-val and --n-test" if data not in IMAGE_DATASETS else
               f"they split a data file (--data FILE.csv, .npy or .npz); {data} has fixed splits")
    if refused:
        verb = "does" if len(refused) == 1 else "do"
        raise ValueError(f"{', '.join(flag(name) for name in refused)} {verb} not apply: {why}")


_WHY_NOT = {
    "gmm": "EM fits a mixture in closed-form steps: it has no layers, epochs, learning rate, dtype or checkpoints",
    "image": "image runs use the fixed splits of the data set, the architectures of nflow_np/image_models.py, "
    "a cosine learning rate, and always draw their pictures",
    "toy": "they are settings of the image recipes (digits, mnist) or of --model gmm",
}
_FOR = {"gmm": "--model gmm", "image": "image data ({data})", "toy": "toy data ({data}) with a flow model"}


def flag(name: str) -> str:
    """``"batch_size"`` → ``"--batch-size"`` (``"n"`` → ``"-n"``, ``"plots"`` → ``"--no-plots"``: as typed)."""
    return {"n": "-n", "plots": "--no-plots", "progress": "--no-progress"}.get(name, "--" + name.replace("_", "-"))


def refuse_unknown(given: dict[str, object], honoured: dict[str, object], kind: str, data: str) -> None:
    """Raise ``ValueError`` naming every option in ``given`` that the run does not honour, and why."""
    refused = [name for name in given if name not in honoured]
    if refused:
        flags = ", ".join(flag(name) for name in refused)
        verb = "does" if len(refused) == 1 else "do"
        file = kind == "toy" and is_data_file(data)
        what = f"the data file {data} with a flow model" if file else _FOR[kind].format(data=data)
        raise ValueError(f"{flags} {verb} not apply to {what}: {_WHY_NOT[kind]}")


def refuse_net_options(given: dict[str, object], honoured: dict[str, object], model: str) -> None:
    """Raise ``ValueError`` naming every given ``--net``/``--hidden``/``--channels``/``--blocks`` that the
    image run's coupling nets do not take, and why (RealNVP's ``--net`` picks the nets; each has its sizes)."""
    nets = ("net", *NET_OPTIONS["mlp"], *NET_OPTIONS["resnet"])
    refused = [name for name in given if name in nets and name not in honoured]  # in the order typed
    if not refused:
        return
    flags = ", ".join(flag(name) for name in refused)
    verb = "does" if len(refused) == 1 else "do"
    if "net" not in honoured:
        raise ValueError(f"{flags} {verb} not apply to --model {model}: --net, --channels and --blocks choose and "
                         "size RealNVP's coupling nets (--model realnvp only); NICE's are MLPs (--hidden)")
    if honoured["net"] == "mlp":
        raise ValueError(f"{flags} {verb} not apply to --net mlp (RealNVP's default): they size the convolutional "
                         "ResNets of --net resnet (docs/conv.md), the MLPs take --hidden")
    raise ValueError(f"{flags} {verb} not apply to --net resnet: it sets the widths of the MLPs of --net mlp; "
                     "the ResNets take --channels and --blocks (docs/conv.md)")


def resolve_train(given: dict[str, object]) -> dict[str, object]:
    """The options of the run: ``given`` (the options typed) over the defaults of its kind.

    Raises
    ------
    ValueError
        A given option that this kind of run would not honour (named, with the reason), or a value
        it cannot honour (``--lr-schedule constant`` for images, ``--dtype float32`` for a mixture).
    """
    data = str(given.get("data", TRAIN_DEFAULTS["data"]))
    model = str(given.get("model", TRAIN_DEFAULTS["model"]))
    kind = run_kind(data, model)
    honoured = defaults_for(data, model, given.get("net"))
    refuse_sizes(given, data)
    if kind == "image":
        refuse_net_options(given, honoured, model)
    refuse_unknown(given, honoured, kind, data)
    if kind == "gmm" and data in IMAGE_DATASETS:
        raise ValueError(f"--model gmm fits toy data; {data} is an image data set (use --model nice or realnvp)")
    if kind == "image" and given.get("lr_schedule", "cosine") != "cosine":
        raise ValueError("--lr-schedule constant does not apply to image data: image runs follow a cosine schedule")
    options = honoured | given
    if sum(options.get(key, 0) for key in FILE_DEFAULTS) >= 1:
        raise ValueError(f"--val-fraction {options['val_fraction']:g} and --test-fraction {options['test_fraction']:g} "
                         "hold out every row: their sum must be below 1, the rest trains")
    if options.get("anchor_every") is not None and options.get("memory") != "invert":
        raise ValueError("--anchor-every applies to --memory invert only")
    return options | {"kind": kind, "given": sorted(given)}


RECORDED = (*TRAIN_DEFAULTS, *FILE_DEFAULTS, "weight_decay", "alpha", "net", "channels", "blocks")
"""The options a checkpoint's arguments may hold (a toy run's, or an image run's recipe settings)."""


def image_record(options: dict[str, object]) -> dict[str, object]:
    """What an image run records in its checkpoints for ``nflow train --resume`` to re-parse: every option it
    honours but where it writes and whether it shows progress, and which options were typed (``given``)."""
    honoured = defaults_for(str(options["data"]), str(options["model"]), options.get("net"))
    skip = ("out", "progress", "resume", "force")
    return {key: options[key] for key in honoured if key not in skip} | {"given": options["given"]}


def help_defaults(data: str | None, model: str | None, net: str | None = None) -> tuple[dict[str, object], str]:
    """The defaults ``nflow train --help`` shows for the data, model and net on the command line, and whose they
    are (``"digits / realnvp --net resnet"``)."""
    data = data or str(TRAIN_DEFAULTS["data"])
    model = model or str(TRAIN_DEFAULTS["model"])
    try:
        defaults = defaults_for(data, model, net)
        whose = f"{data} / {model}" + (" --net resnet" if image_model_name(model, net) == "realnvp_resnet" else "")
        return defaults, whose
    except KeyError:  # an unknown data set or model: the parser names it
        return dict(TRAIN_DEFAULTS), f"{TRAIN_DEFAULTS['data']} / {TRAIN_DEFAULTS['model']}"


# -- nflow train --resume ---------------------------------------------------------------------------
RESUME_MAY_CHANGE = ("out", "progress", "plots", "checkpoint_every", "resume", "skip_nonfinite")
"""What ``nflow train --resume`` may change without changing the numbers of a run that never diverges."""
RESUME_LENGTH = ("epochs", "patience", "time_limit")
"""Training-length options: given with ``--resume``, they lengthen or shorten the run."""


def _shown(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple | list) else str(value)


def resumed_options(given: dict[str, object]) -> dict[str, object]:
    """The options of the run in ``given["resume"]``, read from its newest good checkpoint, with ``given`` applied.

    The recorded arguments are re-parsed like a command line, so a damaged or hostile checkpoint cannot
    pass a value the parser would refuse. A typed option must agree with the recorded one, except those
    of :data:`RESUME_MAY_CHANGE` and the lengths of :data:`RESUME_LENGTH` (a longer or shorter run).
    """
    from nflow_np.cli import UsageError, build_parser, given_options

    resume = Path(given["resume"])
    if given.get("force"):
        raise ValueError("--force starts a fresh run and --resume continues one; give one of them")
    checkpoint, _ = latest_checkpoint(resume / CHECKPOINT_DIR)
    recorded = checkpoint.metadata.get("arguments")
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{checkpoint.path}: records no nflow train arguments")
    argv = ["train"]
    for key in RECORDED:
        value = recorded.get(key)
        if key in (*RESUME_MAY_CHANGE, "force") or value is None:
            continue
        argv.append(f"{flag(key)}={_shown(value)}")
    try:
        parsed = given_options(build_parser().parse_args(argv))
        options = resolve_train(parsed)
    except (UsageError, SystemExit, ValueError) as error:
        raise CheckpointError(f"{checkpoint.path}: its recorded arguments do not parse: {error}") from None
    refuse_unknown(given, options, options["kind"], str(options["data"]))  # what a fresh run of its kind refuses
    for key, value in given.items():
        if key in RESUME_MAY_CHANGE or key in RESUME_LENGTH:
            continue
        if value != options.get(key):
            raise ValueError(
                f"{flag(key)} {_shown(value)} differs from the resumed run's {_shown(options.get(key))}; leave it out"
            )
    if given.get("out") is not None and Path(given["out"]) != resume:
        raise ValueError(f"--out {given['out']} differs from --resume {resume}; a resumed run writes to its folder")
    for key in (*RESUME_MAY_CHANGE, *RESUME_LENGTH):
        if key in given:
            options[key] = given[key]
    every = recorded.get("checkpoint_every")
    options["checkpoint_every"] = given.get("checkpoint_every") or (every if type(every) is int and every > 0 else 0)
    return options | {"out": resume, "resume": resume}
