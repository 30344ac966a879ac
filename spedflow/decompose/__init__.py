"""Decomposition: Poisson normalisation, scree with automatic rank, out-of-core NMF."""

from ._params import NMFParams, ScreeParams
from ._poisson import (PoissonStats, beam_mask, default_beam_mask_radius, merge_poisson,
                       normalise_block, normalised_matrix, poisson_partial, poisson_statistics,
                       scale_factors, undo_normalisation)
from ._scree import (ScreeResult, choose_n_components, marchenko_pastur_count, scree,
                     signflip_block)

__all__ = ["NMFParams", "ScreeParams", "PoissonStats", "beam_mask", "default_beam_mask_radius",
           "merge_poisson", "normalise_block", "normalised_matrix", "poisson_partial",
           "poisson_statistics", "scale_factors", "undo_normalisation", "ScreeResult",
           "choose_n_components", "marchenko_pastur_count", "scree", "signflip_block"]
