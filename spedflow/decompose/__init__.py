"""Decomposition: Poisson normalisation, scree with automatic rank, out-of-core NMF."""

from ._params import NMFParams, ScreeParams
from ._residual import ResidualParams
from ._poisson import (PoissonStats, beam_mask, default_beam_mask_radius, edge_mask, merge_poisson,
                       normalise_block, normalised_matrix, poisson_partial, poisson_statistics,
                       scale_factors, undo_normalisation)
from ._background import classify_components, loading_coverage, spatial_coherence, spot_fraction
from ._nmf import (hals_update_factors, merge_nmf_stats, nmf, nmf_block_update, nmf_minibatch,
                   nndsvda)
from ._scree import (ScreeResult, choose_n_components, marchenko_pastur_count, randomized_svd,
                     randomized_svds,
                     scree, signflip_block)

__all__ = ["NMFParams", "ScreeParams", "ResidualParams", "PoissonStats", "beam_mask", "edge_mask", "default_beam_mask_radius",
           "merge_poisson", "normalise_block", "normalised_matrix", "poisson_partial",
           "poisson_statistics", "scale_factors", "undo_normalisation", "ScreeResult",
           "choose_n_components", "marchenko_pastur_count", "scree", "signflip_block",
           "hals_update_factors", "merge_nmf_stats", "nmf", "nmf_block_update", "nmf_minibatch",
           "nndsvda", "randomized_svd", "randomized_svds", "classify_components", "loading_coverage",
           "spatial_coherence", "spot_fraction"]
