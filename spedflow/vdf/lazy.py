"""Virtual dark-field images of a dask array of patterns (one pass for all vectors)."""

from __future__ import annotations

import dask.array as da
import numpy as np

from .._heap import task_reusing_heap
from ..io._store import check_lazy_patterns
from .kernels import annulus_mask, apply_masks, disc_masks, preprocessed_sums

__all__ = ["vdf_images", "annular_vdf", "preprocessed_vdf_images"]

#: apply_masks as a dask task function reusing the heap (spedflow._heap)
_apply_masks = task_reusing_heap(apply_masks)
_preprocessed_sums = task_reusing_heap(preprocessed_sums)


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


def preprocessed_vdf_images(data: da.Array, centres_used, params, vectors, radius: float, *,
                            counts=None, subpixel: bool = True) -> da.Array:
    """Lazy VDF images of the aligned, background-subtracted patterns, in one task per chunk.

    Equals ``vdf_images(spedflow.preprocess.lazy.preprocess(data, centres_used, params,
    counts=counts), vectors, radius, subpixel=subpixel)``, but each task preprocesses
    its chunk a slab at a time and integrates the discs right away
    (:func:`~spedflow.vdf.kernels.preprocessed_sums`), so no preprocessed chunk is
    ever held in memory.

    Parameters
    ----------
    data : (scan_y, scan_x, ky, kx) dask.array.Array
        Raw (or binned) patterns, whole patterns per chunk.
    centres_used : (scan_y, scan_x, 2) array
        Beam centres the alignment uses.
    params : PreprocessParams
        Resolved, with ``align`` True (without alignment use ``vdf_images`` of
        ``preprocess``).
    vectors : (N, 2) array
    radius : float
    counts : (gain, read_var), optional
    subpixel : bool

    Returns
    -------
    (N, scan_y, scan_x) dask.array.Array of float32
    """
    from ..errors import ParameterError
    from ..preprocess import PreprocessParams
    from ..preprocess import lazy as pre
    _check_data(data)
    if not isinstance(params, PreprocessParams):
        raise ParameterError(f"`params` must be PreprocessParams (got {type(params).__name__})")
    if params.dog_sigma_low is None or params.dog_sigma_high is None:
        raise ParameterError("`params` must be resolved (dog_sigma_low/high set); "
                             "call spedflow.preprocess.resolve(params, beam_radius) first")
    if not params.align:
        raise ParameterError("preprocessed_vdf_images aligns the patterns: `params.align` must "
                             "be True (use vdf_images(preprocess(...)) otherwise)")
    pre._check_sigmas(params.dog_sigma_low, params.dog_sigma_high)
    c = pre._check_centres(centres_used, data, "centres_used")
    masks = disc_masks(vectors, radius, data.shape[2:], subpixel=subpixel)
    n = masks.shape[1]
    out = da.blockwise(_preprocessed_sums, "ijv", data, "ijkl", pre._centres_like(c, data), "ijm",
                       concatenate=True, new_axes={"v": n}, dtype=np.float32,
                       meta=np.empty((0, 0, 0), np.float32), masks=masks,
                       sigma_low=float(params.dog_sigma_low),
                       sigma_high=float(params.dog_sigma_high),
                       counts=None if counts is None else tuple(counts))
    return out.transpose(2, 0, 1)


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
