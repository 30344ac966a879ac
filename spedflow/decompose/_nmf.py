"""Out-of-core non-negative matrix factorisation ``X ~ W H`` (Frobenius loss).

Block-coordinate HALS (Cichocki & Phan 2009) arranged as one pass over the data per
epoch. ``X`` (N x P) is streamed in row chunks ``X_c``; each chunk owns its
loadings ``W_c`` (N x E in total is small: 1e6 x 12 float64 = 96 MB) and, given the
current factors ``H`` (E x P):

1. ``X_c H^T`` is formed once and ``W_c`` gets a few HALS sweeps (exact
   coordinate minimisation of the loss, clipped at 0);
2. the chunk returns the sufficient statistics ``A_c = W_c^T X_c`` (E x P),
   ``B_c = W_c^T W_c`` (E x E) and ``||X_c||^2``, tree-summed by the scheduler.

The client then updates ``H`` with HALS sweeps on ``A = sum A_c``, ``B = sum B_c``
and evaluates the exact loss of the new ``(W, H)`` from the same statistics::

    ||X - W H||^2 = ||X||^2 - 2 <A, H> + <B, H H^T>

so no N x P array is ever held, the client holds only ``H`` and the small sums,
and the result is deterministic for a seed and a chunking.
"""

from __future__ import annotations

import time
import uuid

import numpy as np

from ..errors import InputError, ParameterError
from ._params import NMFParams
from ._scree import randomized_svd

__all__ = ["nmf", "nmf_block_update", "merge_nmf_stats", "hals_update_factors",
           "nndsvda", "nmf_minibatch"]

_TINY = 1e-12
_FAN_IN = 8


# ---------------------------------------------------------------- kernels (pure numpy)
def nmf_block_update(x: np.ndarray, w: np.ndarray, h: np.ndarray, hht: np.ndarray,
                     sweeps: int = 2):
    """Update the loadings of one row chunk and return its statistics.

    Parameters
    ----------
    x : (n, P) ndarray, non-negative data rows.
    w : (n, E) float64, current loadings of these rows.
    h : (E, P) float64, current factors; hht : (E, E) ``h @ h.T``.
    sweeps : HALS sweeps over the E columns of ``w``.

    Returns
    -------
    w : (n, E) float64, updated loadings.
    stats : tuple ``(A (E, P) float64 = w^T x, B (E, E) float64 = w^T w, ||x||^2)``.
    """
    x = np.asarray(x, dtype=np.float32)
    w = np.array(w, dtype=np.float64, copy=True)
    xht = (x @ h.T.astype(np.float32)).astype(np.float64)
    for _ in range(sweeps):
        for k in range(w.shape[1]):
            step = (xht[:, k] - w @ hht[:, k]) / max(hht[k, k], _TINY)
            w[:, k] = np.maximum(w[:, k] + step, 0.0)
    a = (w.T.astype(np.float32) @ x).astype(np.float64)
    return w, (a, w.T @ w, float(np.sum(np.square(x, dtype=np.float64))))


def merge_nmf_stats(*parts):
    """Merge step: element-wise sum of ``(A, B, ||X||^2)`` statistics (associative)."""
    a = parts[0][0].copy()
    b = parts[0][1].copy()
    s = parts[0][2]
    for p in parts[1:]:
        a += p[0]
        b += p[1]
        s += p[2]
    return a, b, s


def hals_update_factors(h: np.ndarray, a: np.ndarray, b: np.ndarray, sweeps: int = 2) -> np.ndarray:
    """HALS sweeps on the factors given ``A = W^T X`` (E, P) and ``B = W^T W`` (E, E)."""
    h = np.array(h, dtype=np.float64, copy=True)
    for _ in range(sweeps):
        for k in range(h.shape[0]):
            h[k] = np.maximum(h[k] + (a[k] - b[k] @ h) / max(b[k, k], _TINY), 0.0)
    return h


def nndsvda(u: np.ndarray, s: np.ndarray, vt: np.ndarray, mean: float):
    """NNDSVD initialisation (Boutsidis & Gallopoulos 2008), zeros filled with ``mean``.

    Parameters
    ----------
    u : (N, E), s : (E,), vt : (E, P) leading SVD of the data; mean : data mean.

    Returns
    -------
    w : (N, E) float64, h : (E, P) float64, non-negative.
    """
    E = s.size
    w = np.zeros((u.shape[0], E))
    h = np.zeros((E, vt.shape[1]))
    w[:, 0] = np.sqrt(s[0]) * np.abs(u[:, 0])
    h[0] = np.sqrt(s[0]) * np.abs(vt[0])
    for j in range(1, E):
        x, y = u[:, j], vt[j]
        xp, xn = np.maximum(x, 0), np.maximum(-x, 0)
        yp, yn = np.maximum(y, 0), np.maximum(-y, 0)
        nxp, nyp, nxn, nyn = (np.linalg.norm(v) for v in (xp, yp, xn, yn))
        mp, mn = nxp * nyp, nxn * nyn
        if mp > mn:
            uu, vv, sig = xp / max(nxp, _TINY), yp / max(nyp, _TINY), mp
        else:
            uu, vv, sig = xn / max(nxn, _TINY), yn / max(nyn, _TINY), mn
        lam = np.sqrt(s[j] * sig)
        w[:, j] = lam * uu
        h[j] = lam * vv
    w[w < _TINY] = mean
    h[h < _TINY] = mean
    return w, h


# ---------------------------------------------------------------- driver
def _as_row_matrix(matrix):
    import dask.array as da
    if getattr(matrix, "ndim", None) != 2:
        raise InputError(f"`matrix` must be 2-D (patterns, pixels) (got shape {getattr(matrix, 'shape', None)})")
    if 0 in matrix.shape:
        raise InputError(f"`matrix` is empty (shape {matrix.shape})")
    if not np.issubdtype(matrix.dtype, np.number):
        raise InputError(f"`matrix` must be numeric (got dtype {matrix.dtype})")
    if isinstance(matrix, np.ndarray):
        matrix = da.from_array(matrix, chunks=(matrix.shape[0], matrix.shape[1]))
    if len(matrix.chunks[1]) > 1:
        matrix = matrix.rechunk({1: -1})
    return matrix


def _tree_sum(items, name):
    from dask import delayed
    level = 0
    while len(items) > 1:
        items = [delayed(merge_nmf_stats)(*items[i:i + _FAN_IN],
                                          dask_key_name=(f"{name}-merge-{level}", i))
                 for i in range(0, len(items), _FAN_IN)]
        level += 1
    return items[0]


def nmf(matrix, n_components: int, params: NMFParams | None = None):
    """Non-negative matrix factorisation of a row-chunked matrix, out of core.

    Parameters
    ----------
    matrix : (N, P) dask.array.Array or ndarray
        Non-negative data (e.g. :func:`normalised_matrix`), chunked by rows; the
        column axis is rechunked to one chunk if needed. Each epoch reads it once.
    n_components : int
        E, ``1 <= E <= min(N, P)``.
    params : NMFParams, optional
        ``max_epochs``, ``tol``, ``w_sweeps``, ``h_sweeps``, ``init``, ``seed``
        (``n_components`` there is ignored: the argument wins).

    Returns
    -------
    factors : (E, P) float64 ndarray (H)
    loadings : (N, E) float64 ndarray (W)
    info : dict
        ``n_epochs``, ``converged``, ``loss`` (final ``||X - W H||_F^2``),
        ``relative_loss`` (``loss / ||X||^2``), ``loss_history``, ``init``,
        ``seconds``.
    """
    params = NMFParams() if params is None else params
    if not isinstance(params, NMFParams):
        raise ParameterError(f"`params` must be NMFParams (got {type(params).__name__})")
    import dask
    from dask import delayed

    x = _as_row_matrix(matrix)
    n, p = x.shape
    if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) \
            or not 1 <= n_components <= min(n, p):
        raise ParameterError(f"`n_components` must be an integer in [1, {min(n, p)}] (got {n_components!r})")
    e = int(n_components)
    t0 = time.perf_counter()

    # Initialisation (one pass for mean/min, plus the randomised SVD for nndsvda).
    x64 = x.astype(np.float64)
    if params.init == "nndsvda":
        xmin, xmean = dask.compute(x.min(), x64.mean())
        if xmin >= 0:
            u, s, vt = randomized_svd(x, e, n_power_iter=2,
                                      n_oversamples=int(max(min(10, min(n, p) - e), 0)),
                                      seed=params.seed)
    else:
        xmin, xmean = dask.compute(x.min(), x64.mean())
    if xmin < 0:
        raise InputError(f"`matrix` must be non-negative for NMF (minimum {float(xmin):.3g})")
    if params.init == "nndsvda":
        w, h = nndsvda(np.asarray(u, np.float64), np.asarray(s, np.float64),
                       np.asarray(vt, np.float64), float(xmean))
    else:
        rng = np.random.default_rng(params.seed)
        scale = np.sqrt(max(float(xmean), _TINY) / e)
        w = scale * rng.random((n, e))
        h = scale * rng.random((e, p))

    blocks = x.to_delayed().ravel().tolist()
    bounds = np.cumsum((0,) + x.chunks[0])
    w_parts = [w[bounds[i]:bounds[i + 1]] for i in range(len(blocks))]
    history: list[float] = []
    converged = False
    xsq = None
    epoch = 0
    run = f"nmf-{uuid.uuid4().hex[:12]}"    # explicit keys: no hashing of arrays per epoch
    for epoch in range(1, params.max_epochs + 1):
        name = f"{run}-{epoch}"
        h_d = delayed(h, name=f"{name}-h")
        hht = h @ h.T
        outs = [delayed(nmf_block_update, nout=2)(blk, wp, h_d, hht, params.w_sweeps,
                                                  dask_key_name=(f"{name}-block", i))
                for i, (blk, wp) in enumerate(zip(blocks, w_parts))]
        w_parts, (a, b, xsq) = dask.compute([o[0] for o in outs],
                                            _tree_sum([o[1] for o in outs], name))
        h = hals_update_factors(h, a, b, params.h_sweeps)
        loss = max(xsq - 2.0 * np.sum(a * h) + np.sum(b * (h @ h.T)), 0.0)
        history.append(float(loss))
        if len(history) > 1 and history[-2] > 0 and \
                abs(history[-2] - loss) / history[-2] < params.tol:
            converged = True
            break
    info = {"n_epochs": epoch, "converged": converged, "loss": history[-1],
            "relative_loss": history[-1] / xsq if xsq else 0.0, "loss_history": history,
            "init": params.init, "seconds": time.perf_counter() - t0}
    return h, np.concatenate(w_parts, axis=0), info


def nmf_minibatch(matrix, n_components: int, params: NMFParams | None = None, *,
                  batch_epochs: int = 20):
    """For comparison: sklearn ``MiniBatchNMF.partial_fit`` over the row chunks.

    Each of ``batch_epochs`` passes feeds every row chunk to ``partial_fit``;
    loadings are then ``transform``-ed chunk by chunk. Same outputs as :func:`nmf`
    (``info`` has ``loss`` computed in one more pass).
    """
    from sklearn.decomposition import MiniBatchNMF

    params = NMFParams() if params is None else params
    x = _as_row_matrix(matrix)
    n, p = x.shape
    if not isinstance(n_components, (int, np.integer)) or not 1 <= n_components <= min(n, p):
        raise ParameterError(f"`n_components` must be an integer in [1, {min(n, p)}] (got {n_components!r})")
    t0 = time.perf_counter()
    model = MiniBatchNMF(n_components=int(n_components), init="random",
                         random_state=params.seed, max_iter=1)
    blocks = x.to_delayed().ravel().tolist()
    for _ in range(batch_epochs):
        for blk in blocks:
            model.partial_fit(np.asarray(blk.compute(), np.float64))
    h = model.components_.astype(np.float64)
    w_parts, loss = [], 0.0
    for blk in blocks:
        xb = np.asarray(blk.compute(), np.float64)
        wb = model.transform(xb)
        loss += float(np.sum((xb - wb @ h) ** 2))
        w_parts.append(wb)
    info = {"n_epochs": batch_epochs, "loss": loss, "seconds": time.perf_counter() - t0,
            "init": "random"}
    return h, np.concatenate(w_parts, axis=0), info
