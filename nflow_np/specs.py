"""Layers that describe themselves: the registry of flow kinds behind ``model.json``.

A layer class that can be saved carries two methods and one decorator::

    @register_flow("rescale", "dim")            # its kind, and the keys of its spec besides "kind"
    class Rescale(Flow):
        def spec(self, where: str = "flow") -> dict:
            return {"kind": "rescale", "dim": self.dim}

        @classmethod
        def from_spec(cls, read: SpecReader) -> Rescale:
            dim = read.dim("dim")
            read.take(dim)                       # parameters it allocates, before allocating them
            return cls(dim, dtype=read.dtype)

That is all a new layer touches: :func:`to_spec` and :func:`flow_from_spec` look the class or the kind
up here and never switch on types. ``spec`` returns JSON-ready values; nested flows are described with
:func:`to_spec` (``where`` is the path inside the spec, for messages). ``from_spec`` reads its values
through the :class:`SpecReader`, whose accessors check type and range and raise
:class:`~nflow_np.files.safe.ModelFileError` naming the path (``flow.flows[3].mask``); the registry
checks the keys (none missing, none unexpected) before ``from_spec`` runs, and turns a constructor's
``ValueError``/``TypeError`` into a ``ModelFileError``. A hostile spec cannot exhaust memory: every
parameter a layer allocates is counted (:meth:`SpecReader.take`) against what the weights file holds.

Saving goes by *exact* class: a subclass may behave differently and the file could not say how, so an
unregistered subclass is refused. A class registered with ``kind=None`` (``Coupling``) saves under the
kind its ``spec`` names and loads as the class registered for that kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from nflow_np.files.safe import MAX_DEPTH, ModelFileError, nesting
from nflow_np.module import as_float_dtype

if TYPE_CHECKING:
    from nflow_np.flows.base import Flow

MAX_DIM = 2**24
"""Largest data dimension a file may describe (a parameter-free layer of that size is still cheap)."""

FLOW_KINDS: dict[str, type] = {}
"""``kind -> class`` of every flow that loads from a spec."""
SPEC_KEYS: dict[str, frozenset[str]] = {}
"""``kind -> keys`` of its spec (``"kind"`` included)."""
OPTIONAL_KEYS: dict[str, frozenset[str]] = {}
"""``kind -> keys`` its spec may leave out (a setting written only when it differs from the default, so that
files written before the setting existed read as the default)."""
_SAVABLE: set[type] = set()


def register_flow(kind: str | None, *keys: str, optional: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Class decorator: ``cls`` saves with ``cls.spec`` and, under ``kind``, loads with ``cls.from_spec``.

    Parameters
    ----------
    kind : str or None
        The ``"kind"`` written to the file; ``None`` for a class that saves under a kind registered by
        another class (its subclasses).
    *keys : str
        The other keys of the spec.
    optional : tuple of str
        Keys the spec may also hold (``from_spec`` reads them with :meth:`SpecReader.has`).

    Raises
    ------
    ValueError
        ``kind`` is registered already (two classes cannot share one name in the file format).
    """

    def decorate(cls: type) -> type:
        if kind is not None:
            if kind in FLOW_KINDS and FLOW_KINDS[kind] is not cls:
                raise ValueError(f"flow kind {kind!r} is registered already, by {FLOW_KINDS[kind].__name__}")
            FLOW_KINDS[kind] = cls
            SPEC_KEYS[kind] = frozenset(("kind", *keys))
            OPTIONAL_KEYS[kind] = frozenset(optional)
        _SAVABLE.add(cls)
        return cls

    return decorate


def to_spec(flow: Flow, where: str = "flow") -> dict:
    """Describe ``flow`` as a JSON-ready nested dict (its parameters are not included).

    Raises
    ------
    TypeError
        A layer the format cannot describe (an unregistered class or subclass, or a coupling whose net
        is not an MLP); the message gives the path inside the model (``flow.flows[1]``).
    """
    if type(flow) not in _SAVABLE:
        raise TypeError(
            f"{where}: cannot save a {type(flow).__name__}; the model format knows {', '.join(FLOW_KINDS)} "
            "(register a new layer with nflow_np.specs.register_flow)"
        )
    return flow.spec(where)


def flow_from_spec(spec: dict, dtype: object = np.float64, max_parameters: int | None = None) -> Flow:
    """Build the flow described by ``spec`` (from :func:`to_spec`), freshly initialised.

    Parameters
    ----------
    spec : dict
        A flow spec, typically read from ``model.json``.
    dtype : float32 or float64
        dtype of the parameters.
    max_parameters : int, optional
        Refuse (before allocating anything) a spec that needs more scalar parameters than this;
        the loaders pass what the weights file could hold, so a hostile spec cannot exhaust memory.

    Raises
    ------
    ModelFileError
        The spec is malformed or too large: the message gives the path inside it (``flow.flows[3].mask``).
    """
    if nesting(spec) > MAX_DEPTH:
        raise ModelFileError(f"flow: nested deeper than {MAX_DEPTH} levels")
    return _build(spec, as_float_dtype(dtype), "flow", _Budget(max_parameters))


def _build(spec: object, dtype: np.dtype, where: str, budget: _Budget) -> Flow:
    if not isinstance(spec, dict):
        raise ModelFileError(f"{where}: expected an object, got {type(spec).__name__}")
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in FLOW_KINDS:
        raise ModelFileError(f"{where}: unknown kind {kind!r}; known: {', '.join(FLOW_KINDS)}")
    expected = SPEC_KEYS[kind]
    missing, unexpected = sorted(expected - set(spec)), sorted(set(spec) - expected - OPTIONAL_KEYS[kind])
    if missing or unexpected:
        raise ModelFileError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")
    try:
        return FLOW_KINDS[kind].from_spec(SpecReader(spec, where, dtype, budget))
    except ModelFileError:
        raise
    except (ValueError, TypeError, OverflowError) as error:  # a constructor refused the values
        raise ModelFileError(f"{where}: {error}") from error


class _Budget:
    """Counts the parameters a spec asks for, layer by layer, and refuses once they exceed ``limit``."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0

    def take(self, count: int, where: str) -> None:
        self.used += count
        if self.limit is not None and self.used > self.limit:
            raise ModelFileError(
                f"{where}: the flow needs more than {self.limit} parameters, more than the weights file can hold"
            )


class SpecReader:
    """One layer's spec as ``from_spec`` reads it: typed, bounded accessors whose errors name the path.

    Attributes
    ----------
    spec : dict
        The raw spec (its keys already checked).
    where : str
        Its path inside the model spec (``flow.flows[2]``).
    dtype : numpy.dtype
        The dtype to build parameters in.
    """

    def __init__(self, spec: dict, where: str, dtype: np.dtype, budget: _Budget) -> None:
        self.spec, self.where, self.dtype, self._budget = spec, where, dtype, budget

    def take(self, count: int) -> None:
        """Count ``count`` parameters against the weights file's size; call before allocating them."""
        self._budget.take(count, self.where)

    def flow(self, key: str) -> Flow:
        """The nested flow under ``key``."""
        return _build(self.spec[key], self.dtype, f"{self.where}.{key}", self._budget)

    def flows(self, key: str) -> list[Flow]:
        """The list of nested flows under ``key``."""
        specs = self.list(key, dict)
        return [_build(s, self.dtype, f"{self.where}.{key}[{i}]", self._budget) for i, s in enumerate(specs)]

    def has(self, key: str) -> bool:
        """Whether the spec holds the optional ``key``."""
        return key in self.spec

    def int(self, key: str, minimum: int = 0, maximum: int | None = None) -> int:
        """An integer ``>= minimum`` (and ``<= maximum``); JSON ``true`` is not an integer."""
        return check_int(self.spec[key], f"{self.where}.{key}", minimum, maximum)

    def dim(self, key: str = "dim") -> int:
        """A dimension: an integer in ``[1, MAX_DIM]``."""
        return self.int(key, 1, MAX_DIM)

    def real(self, key: str) -> float:
        """A number (int or float, not bool)."""
        value = self.spec[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ModelFileError(f"{self.where}.{key}: expected a number, got {value!r}")
        return float(value)

    def bool(self, key: str) -> bool:
        """``true`` or ``false``."""
        value = self.spec[key]
        if not isinstance(value, bool):
            raise ModelFileError(f"{self.where}.{key}: expected true or false, got {value!r}")
        return value

    def choice(self, key: str, options: Iterable[str]) -> str:
        """One of ``options``."""
        value, options = self.spec[key], list(options)
        if not isinstance(value, str) or value not in options:
            raise ModelFileError(f"{self.where}.{key}: unknown {value!r}; known: {', '.join(options)}")
        return value

    def list(self, key: str, kind: type, minimum: int = 0, maximum: int | None = None) -> list[Any]:
        """A list whose items are all of ``kind`` (integers: ``>= minimum``, ``<= maximum``)."""
        value, where = self.spec[key], f"{self.where}.{key}"
        if not isinstance(value, list):
            raise ModelFileError(f"{where}: expected a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            if kind is int:
                check_int(item, f"{where}[{i}]", minimum, maximum)
            elif not isinstance(item, kind):
                raise ModelFileError(f"{where}[{i}]: expected {kind.__name__}, got {item!r}")
        return value


def check_int(value: object, where: str, minimum: int, maximum: int | None = None) -> int:
    """``value`` if it is an integer in ``[minimum, maximum]``, else a :class:`ModelFileError` naming ``where``."""
    # bool is an int subclass; JSON true is not a size
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ModelFileError(f"{where}: expected an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ModelFileError(f"{where}: {value} is above the largest supported value {maximum}")
    return value
