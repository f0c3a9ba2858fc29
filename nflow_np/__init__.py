"""nflow_np: normalizing flows written from scratch in NumPy, every gradient by hand."""

from nflow_np.backend import available_backends, get_backend, register_law, set_backend, using
from nflow_np.distributions import StandardLogistic, StandardNormal
from nflow_np.flows import (
    AdditiveCoupling,
    AffineCoupling,
    Coupling,
    Flow,
    Inverse,
    Permutation,
    Planar,
    Radial,
    Rescale,
    Reverse,
    Sequential,
)
from nflow_np.gmm import GaussianMixture
from nflow_np.model import FlowModel
from nflow_np.module import Module

__version__ = "0.1.0"

__all__ = [
    "AdditiveCoupling",
    "AffineCoupling",
    "Coupling",
    "Flow",
    "FlowModel",
    "Inverse",
    "Module",
    "Permutation",
    "Planar",
    "Radial",
    "GaussianMixture",
    "Rescale",
    "Reverse",
    "Sequential",
    "StandardLogistic",
    "StandardNormal",
    "register_law",
    "available_backends",
    "get_backend",
    "set_backend",
    "using",
]
