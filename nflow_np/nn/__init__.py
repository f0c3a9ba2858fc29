"""Hand-written neural-network pieces: the coupling functions ``c(·)``."""

from nflow_np.nn.layers import ACTIVATIONS, Layer, LeakyReLU, Linear, ReLU, Tanh
from nflow_np.nn.mlp import MLP

__all__ = ["ACTIVATIONS", "MLP", "Layer", "LeakyReLU", "Linear", "ReLU", "Tanh"]
