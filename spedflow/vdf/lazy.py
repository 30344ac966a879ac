"""Virtual dark-field images of a dask array of patterns (one pass for all vectors)."""

from __future__ import annotations

import dask.array as da
import numpy as np

from .._heap import task_reusing_heap
from ..io._store import check_lazy_patterns
from .kernels import annulus_mask, apply_masks, disc_masks

__all__ = ["vdf_images", "annular_vdf"]

#: apply_masks as a dask task function reusing the heap (spedflow._heap)
_apply_masks = task_reusing_heap(apply_masks)


def _check_data(data) -> None:
    check_lazy_patterns(data)


def _masked_sums(data: da.Array, masks) -> da.Array:
    n = masks.shape[1]
    return data.map_blocks(_apply_masks, masks, drop_axis=(2, 3), new_axis=2,
                           chunks=data.chunks[:2] + ((n,),), dtype=np.float32,
                           meta=np.empty((0, 0, 0), np.float32))


def vdf_images(data: da.Array, vectors, radius: float, *, subpixel: bool = True) -> da.Array:
    """Lazy VDF images of every vector, computed in one pass over ``data``.

    Parameters
    ----------
    data : (scan_y, scan_x, ky, kx) dask.array.Array
        Aligned patterns (beam at ``(ky // 2, kx // 2)``), whole patterns per chunk.
    vectors : (N, 2) array
        ``(gy, gx)`` relative to the beam, px.
    radius : float
        Integration disc radius, px (:class:`~spedflow.vdf.VDFParams`).
    subpixel : bool
        Area-weighted disc edge (:func:`~spedflow.vdf.kernels.disc_masks`).

    Returns
    -------
    (N, scan_y, scan_x) dask.array.Array of float32
        Chunked like ``data`` in the scan axes, all vectors in one chunk.
    """
    _check_data(data)
    masks = disc_masks(vectors, radius, data.shape[2:], subpixel=subpixel)
    return _masked_sums(data, masks).transpose(2, 0, 1)


def annular_vdf(data: da.Array, inner: float, outer: float, *, subpixel: bool = True) -> da.Array:
    """Lazy annular dark-field image: the sum of each pattern over ``inner <= |k| <= outer``.

    Parameters
    ----------
    data : (scan_y, scan_x, ky, kx) dask.array.Array
    inner, outer : float
        Radii about the beam at ``(ky // 2, kx // 2)``, px.
    subpixel : bool
        Area-weighted ring edges.

    Returns
    -------
    (scan_y, scan_x) dask.array.Array of float32
    """
    _check_data(data)
    mask = annulus_mask(data.shape[2:], inner, outer, subpixel=subpixel)
    return _masked_sums(data, mask)[..., 0]
