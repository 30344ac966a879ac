"""Friedel's law as a test: does a set of diffraction vectors hold a pair g, -g?

Shared by the VDF merge (vectors of a summed segment) and the NMF residual search
(spots of a candidate weak crystal).
"""

from __future__ import annotations

import numpy as np

__all__ = ["has_friedel_pair"]


def has_friedel_pair(g, tolerance: float) -> bool:
    """True if two of the vectors ``g`` (n, 2), relative to the beam, are (close to)
    each other's Friedel mate: ``|g_i + g_j| <= tolerance``.

    Friedel's law (nearly exact in precession patterns) makes every reflection of a
    crystal come with its mate at -g; noise, and misfits on one side of the beam, do
    not. Vectors within ``tolerance`` of the beam (g ~ 0) pair with nothing, and
    ``tolerance <= 0`` switches the test off (False).
    """
    g = np.asarray(g, np.float64).reshape(-1, 2)
    if tolerance <= 0 or len(g) < 2:
        return False
    d = np.linalg.norm(g[:, None, :] + g[None, :, :], axis=-1)
    np.fill_diagonal(d, np.inf)
    short = np.linalg.norm(g, axis=-1) <= tolerance
    d[short, :] = np.inf
    d[:, short] = np.inf
    return bool((d <= tolerance).any())
