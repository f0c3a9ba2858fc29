"""Flow layers: bijections that return their log-determinant with their output."""

from nflow_np.flows.base import Flow, Inverse, Sequential
from nflow_np.flows.coupling import AdditiveCoupling, AffineCoupling, Coupling, parity_mask
from nflow_np.flows.coupling_law import COUPLING_LAWS, AdditiveLaw, AffineLaw
from nflow_np.flows.elementwise import Permutation, Rescale, Reverse

__all__ = [
    "COUPLING_LAWS",
    "AdditiveCoupling",
    "AdditiveLaw",
    "AffineCoupling",
    "AffineLaw",
    "Coupling",
    "Flow",
    "Inverse",
    "Permutation",
    "Rescale",
    "Reverse",
    "Sequential",
    "parity_mask",
]
