"""Lazy (dask) wrapper of the watershed kernel: one task per image."""

from __future__ import annotations

import dask.array as da
import numpy as np

from ..config import check_range
from ..errors import InputError
from ._params import WatershedParams
from ._watershed import watershed_image

__all__ = ["watershed_stack"]


def watershed_stack(images: da.Array, params: WatershedParams | None = None, *,
                    intensity_scale: float | None = None) -> da.Array:
    """Watershed-segment every image of a stack, lazily.

    Parameters
    ----------
    images : (N, Y, X) dask.array.Array
        VDF images or NMF loading maps (one value per scan position).
    params : WatershedParams, optional
    intensity_scale : float, optional
        The level ``params.min_intensity`` is relative to. Default: the maximum of
        the whole stack (a lazy reduction, only built when ``min_intensity > 0``).

    Returns
    -------
    (N, Y, X) dask.array.Array of int32, chunks (1, Y, X)
        Labels per image as :func:`watershed_image` returns them. Each image is one
        task holding only that image.
    """
    params = WatershedParams() if params is None else params
    if not isinstance(images, da.Array):
        raise InputError(f"`images` must be a dask array; got {type(images).__name__}")
    if images.ndim != 3:
        raise InputError(f"`images` must be 3-D (N, Y, X); got shape {images.shape}")
    if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise InputError(f"`images` must be numeric; got dtype {images.dtype}")
    check_range("intensity_scale", intensity_scale, allow_none=True)
    n, ny, nx = images.shape
    images = images.rechunk((1, ny, nx))
    if intensity_scale is None and params.min_intensity > 0:
        scale = images.max().reshape(1, 1, 1)
    else:
        scale = 1.0 if intensity_scale is None else float(intensity_scale)
    return da.map_blocks(_segment_block, images, scale, dtype=np.int32,
                         meta=np.empty((0, 0, 0), np.int32), params=params)


def _segment_block(block: np.ndarray, scale, params: WatershedParams) -> np.ndarray:
    scale = float(np.asarray(scale).reshape(-1)[0])
    out = np.empty(block.shape, dtype=np.int32)
    for i in range(block.shape[0]):  # one image per block by construction
        out[i] = watershed_image(block[i], params, intensity_scale=scale)
    return out
