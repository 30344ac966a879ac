"""Virtual dark-field (VDF) images from diffraction vectors.

Kernels (NumPy/SciPy, one chunk) are in ``kernels``; dask wrappers in ``lazy``.
"""

from .kernels import (DOSE_SPREAD, VDFParams, annular_sums, annulus_mask, apply_masks,
                      disc_masks, dose_normalised, dose_spread, dose_varies, preprocessed_sums,
                      resolve, vdf_sums)
from .lazy import annular_vdf, preprocessed_vdf_images, vdf_images

__all__ = ["VDFParams", "resolve", "vdf_sums", "annular_sums", "disc_masks", "annulus_mask",
           "apply_masks", "preprocessed_sums", "vdf_images", "preprocessed_vdf_images",
           "annular_vdf", "dose_spread", "dose_varies", "dose_normalised",
           "DOSE_SPREAD"]
