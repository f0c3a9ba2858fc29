"""What ``tests/test_distributed.py`` runs under ``mpiexec -n P``: a fit (or VI fit) whose parameters rank 0 saves.

    mpiexec -n P python tests/distributed_script.py fit|vi|fail|fail-eval OUT.npz [--checkpoint DIR] [--resume DIR]
    mpiexec -n P python tests/distributed_script.py cli-fail|cli-leave|cli-kill -- NFLOW-TRAIN-ARGUMENTS...

``fit``: 100 float64 Adam steps of a RealNVP on two moons (batch 96, so P = 3 gives shards 32, 32, 32 and
P = 2 48, 48; the validation set of 101 rows gives uneven shards), one process or data-parallel.
``nice``, ``realnvp``: a small image NICE or RealNVP (batch norms) on the digits; dequantisation draws noise in the
forward pass.
``fit-variants``: the same by SGD with parameter groups, weight decay, a frozen parameter and clipping.
Each rank prints how many steps went through the node's shared memory (``nflow_np.distributed_reduce``);
under ``--every-rank`` rank 0 then changes its parameters and the others check that theirs did not change.
``vi``: 100 steps of :func:`~nflow_np.vi.fit_vi` on a 2-D target with 50 draws per step (17, 17, 16 at P = 3).
``fail``: rank 1 raises in its third step; ``fail-eval``: rank ``P − 1`` raises in the validation;
``fail-realnvp``: rank 1 raises in the third step of the image RealNVP, whose batch norms hold collective calls.
``cli-fail``: ``nflow train`` with rank 1 raising in its third step; ``cli-leave``: rank 1 raising
before training, outside any collective call (so the others wait for it inside the first step);
``cli-kill``: rank 1 killed by SIGKILL in its 45th step.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import numpy as np

from nflow_np import distributed
from nflow_np.architectures import build_model
from nflow_np.data import load_toy
from nflow_np.optim import SGD, Adam
from nflow_np.train import fit

ROWS, BATCH, EPOCHS = 960, 96, 10  # 10 steps per epoch: 100 steps


def data() -> tuple[np.ndarray, np.ndarray]:
    """Two moons, float64: 960 training rows, 101 validation rows."""
    splits = load_toy("two_moons", n_train=ROWS, n_val=101, n_test=1, seed=3)
    return splits.train, splits.val


LAST: dict[str, object] = {}
"""The model the last :func:`run_fit` trained (to check that its arrays are its own after the fit)."""


def run_fit(
    comm: object, resume: str | None, checkpoint: str | None, epochs: int = EPOCHS, batch: int = BATCH,
    variants: bool = False,
) -> dict[str, np.ndarray]:
    """The fit the test compares across rank counts; the final parameters.

    ``variants``: SGD with momentum instead, two parameter groups (one with weight decay), a frozen
    parameter and gradient clipping: what the divided optimizer step must treat as the whole step does.
    """
    train, val = data()
    model = build_model("realnvp", 2, layers=4, hidden=(32, 32), seed=1)
    optimizer = Adam(model, lr=3e-3)
    if variants:
        model.freeze("flow.0.net.0.b")
        optimizer = SGD(model, lr=3e-3, momentum=0.9, groups=[{"params": "flow.1.*", "lr": 1e-2,
                                                               "weight_decay": 1e-2}])
    fit(
        model, train, val, optimizer=optimizer, epochs=epochs, batch_size=batch, seed=5, patience=None,
        progress=False, comm=comm, checkpoint_dir=checkpoint or resume, checkpoint_every=30 if checkpoint else 0,
        resume=resume is not None, clip_norm=1.0 if variants else None,
    )
    LAST["model"] = model
    return model.state_dict()


def run_vi(comm: object) -> dict[str, np.ndarray]:
    """100 VI steps on the banana target; the final parameters."""
    from nflow_np.targets import get_target
    from nflow_np.vi import fit_vi, make_vi_flow

    flow = make_vi_flow("planar", 2, 4, rng=np.random.default_rng(2))
    fit_vi(flow, get_target("U1"), steps=100, batch_size=50, optimizer=Adam(flow, lr=1e-2), anneal_steps=50,
           seed=4, comm=comm)
    return flow.state_dict()


def command_line(what: str, argv: list[str]) -> int:
    """``nflow train argv`` on every rank, with rank 1 failing as ``what`` says."""
    from nflow_np import cli, density
    from nflow_np.model import FlowModel

    rank = distributed.launched_rank()
    if what == "cli-fail":
        plain_step, calls = FlowModel.nll_and_backward, {"steps": 0}

        def failing_step(self: FlowModel, x: np.ndarray) -> float:
            calls["steps"] += 1
            if calls["steps"] == 3 and rank == 1:
                raise RuntimeError("injected failure in the third step")
            return plain_step(self, x)

        FlowModel.nll_and_backward = failing_step
    elif what == "cli-kill":
        plain_step, calls = FlowModel.nll_and_backward, {"steps": 0}

        def killed_step(self: FlowModel, x: np.ndarray) -> float:
            calls["steps"] += 1
            if calls["steps"] == 45 and rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return plain_step(self, x)

        FlowModel.nll_and_backward = killed_step
    elif rank == 1:
        def leave(*args: object, **kwargs: object) -> float:
            raise OSError("injected failure before training")

        density.compile_kernels = leave
    return cli.main(argv)


def run_image(comm: object, kind: str = "nice") -> dict[str, np.ndarray]:
    """Two epochs of a small NICE or RealNVP on the 8×8 digits, batch 90.

    Both draw dequantisation noise in the forward pass; the RealNVP's batch norms normalise by the batch's moments.
    """
    from nflow_np.data.images import load_images
    from nflow_np.image_models import initialize_rescale
    from nflow_np.image_training import build_image_model

    splits = load_images("digits", seed=0, dtype=np.float64)
    model = build_image_model(kind, splits.shape, splits.levels, (16, 16), None, np.float64, 0)
    if kind == "nice":
        initialize_rescale(model, splits.train[:1000])
    rows = splits.train.reshape(splits.train.shape[0], -1)
    val = splits.val.reshape(splits.val.shape[0], -1)
    # RealNVP by SGD: its batch norms' log-scale gradients nearly cancel (~1e-8), where Adam's step
    # g / (√v + ε) magnifies a rounding difference by lr/ε ~ 1e5 (docs/distributed.md#floating-point)
    optimizer = Adam(model, lr=1e-3) if kind == "nice" else SGD(model, lr=1e-2)
    fit(model, rows, val, optimizer=optimizer, epochs=2, batch_size=90, seed=1, patience=None, progress=False,
        comm=comm)
    return model.state_dict()


def main() -> int:
    if sys.argv[1].startswith("cli-"):
        return command_line(sys.argv[1], sys.argv[3:])
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("fit", "fit-variants", "vi", "nice", "realnvp", "fail", "fail-eval",
                                         "fail-realnvp"))
    parser.add_argument("out")
    parser.add_argument("--resume")
    parser.add_argument("--checkpoint")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--single", action="store_true", help="one process, comm=None")
    parser.add_argument("--every-rank", action="store_true", help="every rank saves its parameters too")
    args = parser.parse_args()
    comm = None if args.single else "auto"
    world = distributed.resolve(comm)
    from nflow_np import distributed_reduce

    shared_steps, plain_reduce = [0], distributed_reduce.SharedStep.reduce

    def counted_reduce(*arguments: object) -> float:
        shared_steps[0] += 1
        return plain_reduce(*arguments)

    distributed_reduce.SharedStep.reduce = counted_reduce
    if args.what == "vi":
        params = run_vi(comm)
    elif args.what in ("nice", "realnvp"):
        params = run_image(comm, args.what)
    else:
        if args.what.startswith("fail"):
            from nflow_np.model import FlowModel

            plain_step, plain_log_prob = FlowModel.nll_and_backward, FlowModel.log_prob
            calls = {"steps": 0}

            def failing_step(self: FlowModel, x: np.ndarray) -> float:
                calls["steps"] += 1
                if calls["steps"] == 3 and distributed.rank(world) == 1:
                    raise RuntimeError("injected failure in the third step")
                return plain_step(self, x)

            def failing_log_prob(self: FlowModel, x: np.ndarray) -> np.ndarray:
                if distributed.rank(world) == distributed.size(world) - 1:
                    raise ValueError("injected failure in the validation")
                return plain_log_prob(self, x)

            if args.what in ("fail", "fail-realnvp"):
                FlowModel.nll_and_backward = failing_step
            else:
                FlowModel.log_prob = failing_log_prob
        try:
            if args.what == "fail-realnvp":
                params = run_image(comm, "realnvp")
            else:
                params = run_fit(comm, args.resume, args.checkpoint, args.epochs, args.batch,
                                 variants=args.what == "fit-variants")
        except Exception as error:
            print(f"rank {distributed.rank(world)}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            return 3
    if distributed.is_root(world):
        np.savez(args.out, **params)
    if args.every_rank:  # each rank's own parameters, to show they are the same bits
        np.savez(f"{args.out}.rank{distributed.rank(world)}.npz", **params)
    print(f"rank {distributed.rank(world)}: {shared_steps[0]} steps through shared memory", flush=True)
    if world is not None and "model" in LAST:  # after the fit every rank's arrays are its own again
        model = LAST["model"]
        if distributed.is_root(world):
            for _, value, _ in model.named_parameters():
                value += 1
        distributed.barrier(world)
        mine = model.state_dict()
        assert distributed.is_root(world) or all(np.array_equal(mine[k], v) for k, v in params.items()), \
            "rank 0's change after the fit reached another rank"
        distributed.barrier(world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
