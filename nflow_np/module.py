"""The parameter protocol shared by every layer, flow and model.

A :class:`Module` keeps its trainable arrays in ``params`` and their gradients, under the same
names and with the same shapes, in ``grads``. Modules built from other modules list them in
``children``. An optimizer walks :meth:`Module.trainable_parameters` and never needs to know which
layer it is updating; saving a model is writing :meth:`Module.state_dict`.

State that is not a parameter (batch norm's running averages) lives in its own slot,
``buffers`` (:meth:`Module.register_buffer`): it is saved and loaded, moved and converted with the
parameters, but it has no gradient, and optimizers and weight decay never see it. A parameter can
be frozen (:meth:`Module.freeze`): it keeps its gradient slot, but optimizers, gradient clipping
and weight decay skip it until :meth:`Module.unfreeze`.

Gradients *accumulate*: every backward pass adds to ``grads`` until :meth:`Module.zero_grad`.

Device: the parameters live in one array module (``numpy`` on the host, ``cupy`` on a GPU);
:meth:`Module.to_device` and :meth:`Module.to_host` move them (``docs/kernels.md#gpu-backends``).
:meth:`Module.state_dict` is always host NumPy, whatever the device, so saved files never hold
device arrays; :meth:`Module.load_state_dict` puts the values back on the module's device.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from fnmatch import fnmatchcase
from types import ModuleType

import numpy as np

from nflow_np import backend

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def as_float_dtype(dtype: object) -> np.dtype:
    """Return ``dtype`` as a NumPy dtype, refusing anything but float32 and float64.

    Parameters
    ----------
    dtype : dtype-like
        ``np.float32``, ``np.float64`` or their names.

    Returns
    -------
    numpy.dtype
    """
    try:
        result = np.dtype(dtype)
    except TypeError as error:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from error
    if result not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {result}")
    return result


class Module:
    """Base class: named parameters, matching gradients, child modules.

    Attributes
    ----------
    params : dict[str, numpy.ndarray]
        Trainable arrays of this module (not of its children).
    grads : dict[str, numpy.ndarray]
        Gradient of the loss w.r.t. each entry of ``params``; same keys, shapes, dtypes.
    children : dict[str, Module]
        Sub-modules, by name.
    buffers : dict[str, numpy.ndarray]
        Non-trainable state of this module (saved, never optimized), e.g. running averages.
    frozen : set[str]
        Names in ``params`` that optimizers skip (:meth:`freeze`).
    """

    cache_attributes: tuple[str, ...] = ()
    """Names of the attributes holding what the last call keeps for the backward pass."""

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.children: dict[str, Module] = {}
        self.buffers: dict[str, np.ndarray] = {}
        self.frozen: set[str] = set()

    def add_param(self, name: str, value: np.ndarray) -> np.ndarray:
        """Register ``value`` as parameter ``name`` with a zero gradient; return it."""
        self.params[name] = value
        self.grads[name] = np.zeros_like(value)
        return value

    def register_buffer(self, name: str, value: np.ndarray) -> np.ndarray:
        """Register ``value`` as non-trainable state ``name`` (saved, moved, never optimized); return it."""
        if name in self.params:
            raise ValueError(f"{name!r} is already a parameter of {type(self).__name__}")
        self.buffers[name] = value
        return value

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """Yield ``(qualified_name, param, grad)`` for this module and all children, depth first.

        Frozen parameters included, buffers not (:meth:`named_buffers`).
        """
        for name, value in self.params.items():
            yield prefix + name, value, self.grads[name]
        for child_name, child in self.children.items():
            yield from child.named_parameters(f"{prefix}{child_name}.")

    def trainable_parameters(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """:meth:`named_parameters` without the frozen ones: what optimizers and clipping walk."""
        for module, prefix in self._named_modules():
            for name, value in module.params.items():
                if name not in module.frozen:
                    yield prefix + name, value, module.grads[name]

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(qualified_name, buffer)`` for this module and all children, depth first."""
        for module, path in self._named_modules(prefix):
            for name, value in module.buffers.items():
                yield path + name, value

    def named_state(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(qualified_name, array)`` of every parameter and buffer: what :meth:`state_dict` saves.

        Module by module, depth first, each module's parameters before its buffers (the order the
        files written before buffers existed have, where the buffers were registered last).
        """
        for module, prefix in self._named_modules():
            for name, value in (module.params | module.buffers).items():
                yield prefix + name, value

    def _named_modules(self, prefix: str = "") -> Iterator[tuple[Module, str]]:
        """Yield ``(module, prefix of its qualified names)`` for this module and every one below it."""
        yield self, prefix
        for child_name, child in self.children.items():
            yield from child._named_modules(f"{prefix}{child_name}.")

    def freeze(self, *patterns: str) -> list[str]:
        """Freeze the parameters whose qualified names match any of ``patterns``; return their names.

        Patterns are shell-style (``fnmatch``: ``"flow.0.*"``, ``"*.scale"``); no pattern freezes every
        parameter. A frozen parameter keeps its value and its gradient slot (the backward pass still
        fills it), but optimizers, gradient clipping and weight decay skip it.

        Raises
        ------
        ValueError
            A pattern matches no parameter (nothing is frozen then).
        """
        return self._set_frozen(patterns, frozen=True)

    def unfreeze(self, *patterns: str) -> list[str]:
        """Undo :meth:`freeze` for the parameters matching ``patterns`` (none: every parameter)."""
        return self._set_frozen(patterns, frozen=False)

    def is_frozen(self, name: str) -> bool:
        """Whether the parameter with qualified name ``name`` is frozen."""
        for module, prefix in self._named_modules():
            if name.startswith(prefix) and name[len(prefix) :] in module.params:
                return name[len(prefix) :] in module.frozen
        raise KeyError(f"no parameter named {name!r}")

    def _set_frozen(self, patterns: Iterable[str], frozen: bool) -> list[str]:
        patterns = tuple(patterns) or ("*",)
        owners = [(module, prefix + name, name) for module, prefix in self._named_modules() for name in module.params]
        unmatched = [p for p in patterns if not any(fnmatchcase(full, p) for _, full, _ in owners)]
        if unmatched:
            raise ValueError(f"no parameter matches {unmatched}; parameters: {[full for _, full, _ in owners]}")
        chosen = [(module, full, name) for module, full, name in owners if any(fnmatchcase(full, p) for p in patterns)]
        for module, _, name in chosen:
            (module.frozen.add if frozen else module.frozen.discard)(name)
        return [full for _, full, _ in chosen]

    def modules(self) -> Iterator[Module]:
        """Yield this module and every module below it, depth first."""
        yield self
        for child in self.children.values():
            yield from child.modules()

    def free_caches(self) -> None:
        """Drop what this module and its children keep for a backward pass (``memory="invert"``)."""
        for module in self.modules():
            for name in module.cache_attributes:
                setattr(module, name, None)

    def cached_arrays(self) -> list[np.ndarray]:
        """The distinct memory buffers that the caches of this module and its children keep alive.

        A view counts as the array it views (that whole buffer stays allocated), each buffer once.
        """
        buffers: dict[int, np.ndarray] = {}
        pending = [getattr(m, name, None) for m in self.modules() for name in m.cache_attributes]
        while pending:
            item = pending.pop()
            if backend.is_array(item):
                while backend.is_array(item.base):
                    item = item.base
                buffers[id(item)] = item
            elif isinstance(item, tuple | list):
                pending.extend(item)
            elif isinstance(item, dict):
                pending.extend(item.values())
        return list(buffers.values())

    def cached_nbytes(self) -> int:
        """Bytes of :meth:`cached_arrays`: the activation memory held for the backward pass."""
        return sum(array.nbytes for array in self.cached_arrays())

    def zero_grad(self) -> None:
        """Set every gradient (this module and children) to zero, in place."""
        for _, _, grad in self.named_parameters():
            grad.fill(0)

    def num_parameters(self) -> int:
        """Total number of scalar parameters."""
        return sum(value.size for _, value, _ in self.named_parameters())

    @property
    def array_module(self) -> ModuleType | None:
        """The array module (``xp``) holding the parameters (or the buffers): ``numpy`` or a device module
        such as ``cupy``; ``None`` for a module without either."""
        for _, value in self.named_state():
            return backend.array_module(value)
        return None

    def to_device(self, xp: ModuleType | None = None) -> Module:
        """Move every parameter and gradient (this module and children) to ``xp``, in place; return self.

        Parameters
        ----------
        xp : module, optional
            The array module to move to; default: the active backend's
            (:func:`nflow_np.backend.array_module`), so on a CPU backend this leaves the model on the host.

        Caches of the last call are dropped (they live on the old device). Build the optimizer
        after the move: its state is allocated like the parameters.
        """
        xp = backend.array_module() if xp is None else xp
        for module in self.modules():
            for name in module.params:
                module.params[name] = _move(module.params[name], xp)
                module.grads[name] = _move(module.grads[name], xp)
            for name in module.buffers:
                module.buffers[name] = _move(module.buffers[name], xp)
        self.free_caches()
        return self

    def to_host(self) -> Module:
        """Move every parameter and gradient to host NumPy arrays (:meth:`to_device` with ``numpy``)."""
        return self.to_device(np)

    @property
    def dtype(self) -> np.dtype | None:
        """The dtype of the parameters (of the buffers for a module with buffers alone), or ``None`` for a
        module without either."""
        for _, value in self.named_state():
            return value.dtype
        return None

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host NumPy copies of all parameters and buffers under their qualified names (on any device)."""
        return {name: backend.to_host(value, copy=True) for name, value in self.named_state()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Copy ``state`` into the parameters and buffers, in place, after checking every name and shape.

        Nothing is written unless every entry matches, so a bad state never half-loads. ``state``
        holds host arrays (or arrays of the module's device); they are copied to the parameters'
        device.
        """
        own = dict(self.named_state())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"state does not match the module: missing {missing}, unexpected {unexpected}")
        for name, value in own.items():
            new = state[name] if backend.is_array(state[name]) else np.asarray(state[name])
            if new.shape != value.shape:
                raise ValueError(f"parameter {name!r}: shape {new.shape} in state, {value.shape} in module")
            if new.dtype.kind != "f":
                raise TypeError(f"parameter {name!r}: dtype {new.dtype} in state is not floating point")
        for module, prefix in self._named_modules():
            module.check_state({name: state[prefix + name] for name in (*module.params, *module.buffers)}, prefix)
        for name, value in own.items():
            value[...] = _move(state[name], backend.array_module(value))

    def check_state(self, state: dict[str, np.ndarray], prefix: str = "") -> None:
        """Refuse values this module's arrays may not hold; :meth:`load_state_dict` calls it before writing.

        ``state`` maps this module's own names (not qualified) to the arrays about to be loaded, shapes
        already checked; ``prefix`` is the qualified path, for messages. Nothing is refused here: a module
        whose arrays must satisfy more than a shape (a scale that must stay positive) overrides it and
        raises ``ValueError`` naming the entry.
        """

    def astype(self, dtype: object) -> Module:
        """Convert every parameter and gradient to ``dtype`` (float32/float64), in place; return self."""
        dtype = as_float_dtype(dtype)
        self._astype_own(dtype)
        for child in self.children.values():
            child.astype(dtype)
        return self

    def _astype_own(self, dtype: np.dtype) -> None:
        for name in self.params:
            self.params[name] = self.params[name].astype(dtype)
            self.grads[name] = self.grads[name].astype(dtype)
        for name in self.buffers:
            self.buffers[name] = self.buffers[name].astype(dtype)

    def __repr__(self) -> str:
        """``AffineCoupling(dim=2, law='affine', …; 4,420 parameters)``; a container lists its flows below it."""
        return "\n".join(self._repr_lines(""))

    def _repr_lines(self, indent: str, label: str = "") -> list[str]:
        """This module on one line (its settings, its nets inline), then every child flow indented."""
        flows = {name: child for name, child in self.children.items() if hasattr(child, "_inverse")}
        nets = [f"{name}={child._repr_head([])}" for name, child in self.children.items() if name not in flows]
        lines = [indent + label + self._repr_head(nets)]
        for name, child in flows.items():
            lines += child._repr_lines(indent + "  ", f"({name}): ")
        return lines

    def _repr_head(self, extra: list[str]) -> str:
        """``Name(setting=value, …, extra; N parameters)`` from the public int/float/str/bool/sequence attributes."""
        def simple(value: object) -> bool:
            if isinstance(value, list | tuple):
                return all(isinstance(item, int | float | str) for item in value)
            return isinstance(value, int | float | str | bool)

        fields = [f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and simple(v)] + extra
        return f"{type(self).__name__}({', '.join(fields)}; {self.num_parameters():,} parameters)"


def _move(array: object, xp: ModuleType) -> object:
    """``array`` in the array module ``xp``: itself if it is there already, else a copy."""
    if backend.array_module(array) is xp:
        return array
    host = backend.to_host(array)
    return host if xp is np else xp.asarray(host)
