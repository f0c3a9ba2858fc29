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
from nflow_np.fpmode import flush_denormals, get_flush_denormals, set_flush_denormals
from nflow_np.gmm import GaussianMixture
from nflow_np.grad_mode import is_grad_enabled, no_grad
from nflow_np.model import FlowModel
from nflow_np.module import Module
from nflow_np.threads import get_num_threads, num_threads, set_num_threads

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
    "flush_denormals",
    "get_backend",
    "get_flush_denormals",
    "get_num_threads",
    "is_grad_enabled",
    "no_grad",
    "num_threads",
    "set_backend",
    "set_flush_denormals",
    "set_num_threads",
    "using",
]
