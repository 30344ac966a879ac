"""Simulated SPED data of nanocrystals with ground truth (``spedflow simulate``)."""

from ._scene import SimParams
from ._simulate import simulate, simulate_array

__all__ = ["SimParams", "simulate", "simulate_array"]
