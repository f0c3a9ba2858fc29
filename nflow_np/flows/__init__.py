"""Flow layers: bijections that return their log-determinant with their output."""

from nflow_np.flows.base import Flow, Inverse, Sequential
from nflow_np.flows.conv_coupling import ConvAffineCoupling  # imported here so that model files know its kind
from nflow_np.flows.coupling import AdditiveCoupling, AffineCoupling, Coupling, parity_mask
from nflow_np.flows.coupling_law import COUPLING_LAWS, AdditiveLaw, AffineLaw
from nflow_np.flows.elementwise import Permutation, Rescale, Reverse, Standardize, leading_standardize
from nflow_np.flows.image import FactorOut, Squeeze, channel_mask, checkerboard_mask
from nflow_np.flows.normalization import ActNorm, BatchNorm, training_mode
from nflow_np.flows.planar import Planar
from nflow_np.flows.preprocessing import Dequantize, Logit, Scale
from nflow_np.flows.radial import Radial

__all__ = [
    "COUPLING_LAWS",
    "ActNorm",
    "AdditiveCoupling",
    "AdditiveLaw",
    "AffineCoupling",
    "AffineLaw",
    "BatchNorm",
    "ConvAffineCoupling",
    "Coupling",
    "Dequantize",
    "FactorOut",
    "Flow",
    "Inverse",
    "Logit",
    "Permutation",
    "Planar",
    "Radial",
    "Rescale",
    "Reverse",
    "Scale",
    "Sequential",
    "Squeeze",
    "Standardize",
    "channel_mask",
    "checkerboard_mask",
    "leading_standardize",
    "parity_mask",
    "training_mode",
]
