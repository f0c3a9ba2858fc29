"""Hand-written neural-network pieces: the coupling functions ``c(·)``."""

from nflow_np.nn.layers import ACTIVATIONS, Dense, Layer, LeakyReLU, Linear, ReLU, Tanh
from nflow_np.nn.mlp import MLP

__all__ = ["ACTIVATIONS", "MLP", "Dense", "Layer", "LeakyReLU", "Linear", "ReLU", "Tanh"]
