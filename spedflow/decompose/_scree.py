"""Scree (explained variance ratio) from a streamed randomised SVD, and the rank choice."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import check_range
from ..errors import InputError, ParameterError

__all__ = ["ScreeResult", "scree", "choose_n_components", "marchenko_pastur_count",
           "signflip_block", "randomized_svd", "randomized_svds", "noise_draw_seeds",
           "min_block_rows"]


@dataclass(frozen=True)
class ScreeResult:
    """Leading singular values of the mean-centred (normalised, masked) data matrix.

    explained_variance_ratio : (k,) float64, ``s_i**2 / total_variance``.
    singular_values : (k,) float64.
    total_variance : float, sum of squares of the centred matrix.
    shape : (N, P) of the matrix.
    noise_edge : float or None, largest explained variance ratio of the
        random-sign-flipped centred matrix (the noise floor of signflip parallel
        analysis), the mean over ``noise_edges``; None if not computed.
    noise_edges : tuple of float, the floor of each sign-flip draw.
    """

    explained_variance_ratio: np.ndarray
    singular_values: np.ndarray
    total_variance: float
    shape: tuple[int, int]
    noise_edge: float | None = None
    noise_edges: tuple = ()


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def signflip_block(block: np.ndarray, row0: int, n_cols: int, seed: int) -> np.ndarray:
    """Kernel: multiply each element by a pseudo-random sign fixed by its (row, col).

    Each row is cut into words of 64 columns; word ``w`` of row ``i`` is
    splitmix64(``i * n_words + w`` + (seed + 1) * golden ratio), ``n_words =
    ceil(n_cols / 64)``, and bit ``b`` of it (least significant first) is the sign of
    column ``64 w + b`` (1: negated). The flipped matrix does not depend on the row
    chunking, and one hash serves 64 elements (the scree flips every element of the
    matrix on each of its passes).

    Parameters
    ----------
    block : (n, P) ndarray, rows ``row0 .. row0 + n`` of the matrix, ``P == n_cols``.
        Returned in native byte order.
    """
    n, p = block.shape
    n_words = -(-int(n_cols) // 64)
    with np.errstate(over="ignore"):
        z = (np.arange(row0, row0 + n, dtype=np.uint64)[:, None] * np.uint64(n_words)
             + np.arange(-(-p // 64), dtype=np.uint64)[None] + np.uint64(seed + 1) * _GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    bits = np.unpackbits(z.astype("<u8").view(np.uint8), axis=1, count=p, bitorder="little")
    block = np.ascontiguousarray(block)
    if not block.dtype.isnative:  # the sign bit is where the native byte order puts it
        block = block.astype(block.dtype.newbyteorder("="))
    if block.dtype.kind == "f" and block.dtype.itemsize in (4, 8):
        # flip the IEEE sign bit: ~20x faster than a multiply or a masked negate
        uint = np.uint32 if block.dtype.itemsize == 4 else np.uint64
        flipped = bits.astype(uint)
        flipped <<= uint(8 * block.dtype.itemsize - 1)
        flipped ^= block.view(uint)
        return flipped.view(block.dtype)
    return block * (1 - 2 * bits.astype(block.dtype))


def _as_dask_matrix(matrix):
    import dask.array as da
    if matrix.ndim != 2:
        raise InputError(f"`matrix` must be 2-D (patterns, pixels) (got shape {matrix.shape})")
    if 0 in matrix.shape:
        raise InputError(f"`matrix` is empty (shape {matrix.shape})")
    if isinstance(matrix, np.ndarray):
        matrix = da.from_array(matrix, chunks=(max(1, matrix.shape[0]), matrix.shape[1]))
    if len(matrix.chunks[1]) > 1:
        matrix = matrix.rechunk({1: -1})
    return matrix


def _project_block(x, row0, mean, flip_seeds, mats, left):
    """Kernel of one pass over a row block, for several variants of the matrix at once.

    For each variant ``i``: ``x~ @ mats[i]`` (right) or ``x~^T @ mats[i]`` (left), where
    ``x~`` is the block minus ``mean`` (if given), sign-flipped with ``flip_seeds[i]``
    unless that is None. The block is read (and centred) once for all variants.
    Products in float32, results float64; returns a tuple, one per variant.
    """
    x = np.asarray(x, np.float32)
    if mean is not None:
        x = x - mean.astype(np.float32)
    out = []
    for flip_seed, mat in zip(flip_seeds, mats):
        xi = x if flip_seed is None else signflip_block(x, row0, x.shape[1], flip_seed)
        mat = np.asarray(mat, np.float32)
        out.append((xi.T @ mat if left else xi @ mat).astype(np.float64))
    return tuple(out)


def _add_projection(total, x, row0, mean, flip_seeds, mats, left):
    """``total`` (a tuple from :func:`_project_block`, or None) plus the products of one
    more row block: one step of a chain that accumulates many blocks' left products
    (P x l per variant: large for a wide matrix) in one buffer. ``total`` is added into
    the new products, not changed (a task's input)."""
    part = _project_block(x, row0, mean, flip_seeds, mats, left)
    if total is not None:
        for p, t in zip(part, total):
            p += t
    return part


#: The running sums of left products (P x l per variant, float64) one pass of
#: :func:`randomized_svds` keeps, one per chain, at most (but at least one; each chain
#: step briefly holds two: its input's and its own): with P = 10^6 pixels (a 1024 x 1024
#: detector), l = 50 and four variants, one block's are 1.6 GB, and a sum of eight
#: per task asked a worker for 11.8 GiB. A chain's blocks are not held back until it
#: reaches them: where the matrix is read from disk rather than held in memory, idle
#: threads may read ahead.
_LEFT_BYTES = 4 * 2**30


def _sum(*parts):
    """Element-wise sum of tuples of arrays."""
    out = [a.copy() for a in parts[0]]
    for q in parts[1:]:
        for o, a in zip(out, q):
            o += a
    return tuple(out)


def _tree_sum(items, fan_in=8):
    from dask import delayed
    while len(items) > 1:
        items = [delayed(_sum, pure=True)(*items[i:i + fan_in]) for i in range(0, len(items), fan_in)]
    return items[0]


def min_block_rows(ell: int) -> int:
    """Rows a block of the matrix should hold for :func:`randomized_svds` with ``ell``
    probe vectors (``n_components + n_oversamples``): twice as many. A wide matrix's
    row blocks are short (32 MB of a 1024 x 1024 detector's patterns: 8 rows), and each
    block's left product (P x l) outgrew it many times: the scree's passes moved
    memory, not numbers (451 s for 1024 x 10^6; shorter blocks are rechunked)."""
    return 2 * int(ell)


def randomized_svd(matrix, k: int, *, n_power_iter: int = 4, n_oversamples: int = 10,
                   seed: int = 0, mean: np.ndarray | None = None,
                   signflip_seed: int | None = None):
    """Randomised SVD (Halko, Martinsson & Tropp 2011) streaming a row-chunked matrix.

    Every pass is a graph of per-chunk products: ``X_c @ Omega`` (kept per chunk, N x l
    in total, small) or ``X_c^T Q_c`` (P x l, tree-summed). The client orthonormalises
    the thin N x l / P x l matrices. ``2 * n_power_iter + 2`` passes.

    Parameters
    ----------
    matrix : (N, P) dask.array.Array or ndarray, chunked by rows.
    k : number of singular triplets.
    mean : (P,) optional, subtracted from every row on the fly (centring).
    signflip_seed : int, optional, decompose the sign-flipped matrix instead
        (:func:`signflip_block`).

    Returns
    -------
    u : (N, k), s : (k,), vt : (k, P) float64 ndarrays.
    """
    return randomized_svds(matrix, k, [(seed, signflip_seed)], n_power_iter=n_power_iter,
                           n_oversamples=n_oversamples, mean=mean)[0]


def randomized_svds(matrix, k: int, variants, *, n_power_iter: int = 4,
                    n_oversamples: int = 10, mean: np.ndarray | None = None) -> list:
    """Several randomised SVDs of variants of one matrix, sharing every pass over it.

    ``variants`` is a list of ``(seed, signflip_seed)``: the random start of each
    and which sign flip (None: the matrix itself). Each pass reads every chunk once
    and computes the products of all variants from it, so the data and its
    sign-flipped null cost ``2 * n_power_iter + 2`` passes together, not twice that.
    Each variant's result equals :func:`randomized_svd` with the same arguments (to
    rounding, for a wide matrix: its left products are summed in chains whose number
    depends on the number of variants, ``_LEFT_BYTES``).

    Returns
    -------
    list of ``(u, s, vt)``, one per variant (see :func:`randomized_svd`).
    """
    import dask
    from dask import delayed

    from ..cluster import scattered
    m = _as_dask_matrix(matrix)
    n, p = m.shape
    ell = int(min(k + n_oversamples, n, p))
    if max(m.chunks[0]) < min_block_rows(ell) < n:
        m = m.rechunk({0: min_block_rows(ell)})
    blocks = m.to_delayed().ravel().tolist()
    rows = np.cumsum((0,) + m.chunks[0])
    mean_d = delayed(mean, pure=True) if mean is not None else None
    flips = tuple(f for _, f in variants)

    def right(mats):  # (P x l each; float32 once here, as every task would make them)
        mats = tuple(np.asarray(a, np.float32) for a in mats)
        shipped = scattered([mats], broadcast=True)
        mats_d = shipped[0] if shipped else delayed(mats, pure=True)
        parts = [delayed(_project_block, pure=True)(b, int(rows[i]), mean_d, flips, mats_d, False)
                 for i, b in enumerate(blocks)]
        done = dask.compute(parts)[0]
        return [np.concatenate([d[v] for d in done], axis=0) for v in range(len(variants))]

    # the left pass accumulates its blocks' products in as many chains as keep them
    # within _LEFT_BYTES, each a block at a time (every block its own where they are small)
    part_bytes = 8 * p * ell * len(variants)
    n_chains = int(min(len(blocks), max(1, _LEFT_BYTES // part_bytes)))
    chains = np.array_split(np.arange(len(blocks)), n_chains)

    def left(qs):
        pieces = [tuple(q[rows[i]:rows[i + 1]] for q in qs) for i in range(len(blocks))]
        pieces = scattered(pieces) or pieces  # each block's rows of Q, to its task
        parts = []
        for chain in chains:
            total = None
            for i in chain:
                total = delayed(_add_projection, pure=True)(
                    total, blocks[i], int(rows[i]), mean_d, flips, pieces[i], True)
            parts.append(total)
        return list(dask.compute(_tree_sum(parts))[0])

    omegas = [np.random.default_rng(seed).standard_normal((p, ell)) for seed, _ in variants]
    qs = [np.linalg.qr(y)[0] for y in right(omegas)]
    for _ in range(n_power_iter):
        zs = [np.linalg.qr(y)[0] for y in left(qs)]
        qs = [np.linalg.qr(y)[0] for y in right(zs)]
    out = []
    for q, bt in zip(qs, left(qs)):  # bt: (P, l) = (Q^T X)^T
        vb, s_, ubt = np.linalg.svd(bt, full_matrices=False)
        out.append(((q @ ubt.T)[:, :k], s_[:k], vb.T[:k]))
    return out


def noise_draw_seeds(seed: int, noise_draws: int) -> list[tuple[int, int]]:
    """``(random start, sign-flip seed)`` of each draw of :func:`scree`'s noise floor
    (for :func:`randomized_svds`): draw ``d`` starts from ``seed + 1 + d`` (the data's
    own start is ``seed``) and flips with ``seed + 7919 d``, so that the draws of
    neighbouring seeds do not repeat each other's flips (with ``seed + d``, seeds 0
    and 1 would share two of their three)."""
    return [(seed + 1 + d, seed + 7919 * d) for d in range(noise_draws)]


def scree(matrix, n_components: int = 50, *, n_power_iter: int = 4, n_oversamples: int = 10,
          seed: int = 0, noise_edge: bool = True, noise_draws: int = 3) -> ScreeResult:
    """Explained variance ratio of the leading components, streaming the data.

    The column mean and the total sum of squares are one mergeable pass; the
    randomised SVD (:func:`randomized_svd`, Halko et al. 2011) of the centred
    matrix (centred on the fly) costs ``2 * (n_power_iter + 1)`` more passes, shared
    with the noise floor's SVD (:func:`randomized_svds`). Nothing of size
    N x P is held in memory.

    With ``noise_edge`` the noise floor is measured by signflip parallel analysis
    (Hong, Sheng & Dobriban 2020): flipping the sign of every element at random
    destroys the low-rank (signal) structure but keeps every element's magnitude,
    so the top singular value of the flipped matrix is the edge of the noise
    spectrum *with the data's own* heteroscedasticity and heavy tails (sparse,
    low-count pixels make Poisson-normalised noise far from Gaussian, which moves
    the edge well above the Marchenko-Pastur value). No extra passes: the null's
    products are computed from the same chunk reads.

    The floor is the mean over ``noise_draws`` independent sign flips: the top
    singular value of one flipped matrix varies from draw to draw by several per
    cent on sparse, heavy-tailed data (its top vector sits on a few bright rows and
    pixels), enough to move the count of a scree whose tail runs smoothly into the
    noise; the mean of three has ~0.6 times that spread. Each draw adds a sign flip
    and a matrix product per chunk and pass (no extra pass over the data).

    Parameters
    ----------
    matrix : (N, P) dask.array.Array or ndarray
        Normalised data matrix (patterns x unmasked pixels), chunked by rows.
    n_components : int
        Number of leading components k (clipped to ``min(N - 1, P)``).
    n_power_iter, n_oversamples, seed
        Randomised SVD accuracy knobs (see :class:`ScreeParams`).
    noise_edge : bool
        Also measure the signflip noise floor (``ScreeResult.noise_edge``).
    noise_draws : int
        Number of independent sign flips the floor is averaged over.

    Returns
    -------
    ScreeResult
    """
    check_range("n_components", n_components, low=1, integer=True)
    check_range("n_power_iter", n_power_iter, low=0, integer=True)
    check_range("n_oversamples", n_oversamples, low=0, integer=True)
    check_range("seed", seed, low=0, integer=True)
    check_range("noise_draws", noise_draws, low=1, high=20, integer=True)
    import dask

    m = _as_dask_matrix(matrix)
    n, p = m.shape
    if n < 2:
        raise InputError(f"`matrix` needs at least 2 patterns for a scree (got {n})")
    k = int(min(n_components, n - 1, p))
    m64 = m.astype(np.float64)
    mean, sumsq = dask.compute(m64.mean(axis=0), (m64 ** 2).sum())
    total = float(sumsq - n * np.dot(mean, mean))
    if total <= 0:
        raise InputError("every pattern is the same (no variance over the scan): there is no "
                         "component to find")
    oversamples = int(max(min(n_oversamples, min(n, p) - k), 0))
    # the data and (with noise_edge) its sign-flipped null share every pass; the null
    # has the same subspace size as the scree itself: the randomised estimates of a
    # flat (noise) spectrum are biased low, and equally so for data and null.
    draws = noise_draw_seeds(seed, noise_draws) if noise_edge else []
    svds = randomized_svds(m, k, [(seed, None)] + draws, n_power_iter=n_power_iter,
                           n_oversamples=oversamples, mean=mean)
    s = svds[0][1]
    edges = tuple(float(v[1][0] ** 2 / total) for v in svds[1:])
    edge = float(np.mean(edges)) if edges else None
    return ScreeResult(s ** 2 / total, s, total, (int(n), int(p)), edge, edges)


def marchenko_pastur_count(evr: np.ndarray, shape: tuple[int, int]) -> tuple[int, float]:
    """Number of components above the noise edge, and the edge (in evr units).

    Noise of variance sigma^2 in an ``n x p`` matrix (n = N - 1 after centring) has
    eigenvalues below ``sigma^2 (sqrt(n) + sqrt(p))^2`` (Marchenko-Pastur edge;
    fluctuations above it are O(n^-2/3), negligible). sigma^2 is not assumed (the
    detector gain and preprocessing change it): it is the variance left after the
    E signal components, ``(1 - sum_{i<E} evr_i) / ((n - E)(p - E))``, and E is the
    fixed point of "count eigenvalues above the edge" (monotone: starting from
    E = 0 overestimates sigma, each step can only add components).
    """
    evr = np.asarray(evr, np.float64)
    n, p = shape[0] - 1, shape[1]
    e = 0
    for _ in range(evr.size + 1):
        resid = max(1.0 - evr[:e].sum(), 0.0)
        dof = max((n - e) * (p - e), 1)
        edge = resid / dof * (np.sqrt(max(n - e, 1)) + np.sqrt(max(p - e, 1))) ** 2
        new = int((evr > edge).sum())
        if new == e:
            break
        e = new
    return e, float(edge)


def _elbow(evr: np.ndarray) -> int:
    """Kneedle on the log-scree: the point farthest below the chord first-last."""
    y = np.log10(np.maximum(evr, np.finfo(float).tiny))
    x = np.arange(y.size, dtype=float)
    chord = y[0] + (y[-1] - y[0]) * x / max(x[-1], 1.0)
    return int(np.argmax(chord - y))


def choose_n_components(evr, *, noise_edge: float | None = None,
                        shape: tuple[int, int] | None = None,
                        max_components: int | None = None) -> tuple[int, str]:
    """Automatic number of components from a scree.

    With ``noise_edge`` (from :func:`scree`, signflip parallel analysis; the
    preferred criterion) E is the number of components whose explained variance
    ratio exceeds the largest one of the sign-flipped (signal-free) matrix: they
    stand out of the data's own noise, whatever its distribution. Otherwise, with
    ``shape`` (the (N, P) of the matrix, as in :class:`ScreeResult`) the
    count is the number of eigenvalues above the Marchenko-Pastur edge of the
    noise (see :func:`marchenko_pastur_count`): Poisson-normalised noise is
    near-homoscedastic, its eigenvalues form a flat plateau ending at that edge,
    and every component above it carries signal that NMF should be able to
    represent. Without ``shape`` the elbow (maximum distance below the chord of
    the log-scree, "kneedle") is used. The result is clipped to
    ``[1, max_components]``.

    Parameters
    ----------
    evr : (k,) array of explained variance ratios, decreasing.
    noise_edge : float, optional, noise floor in explained-variance-ratio units.
    shape : (N, P), optional.
    max_components : int, optional, upper bound.

    Returns
    -------
    (E, reason) : int and a one-line explanation to store with the result.
    """
    evr = np.asarray(evr, np.float64)
    if evr.ndim != 1 or evr.size < 2:
        raise ParameterError(f"`evr` must be 1-D with at least 2 values (got shape {evr.shape})")
    if not np.all(np.isfinite(evr)) or np.any(evr < 0):
        raise ParameterError("`evr` must be finite and non-negative")
    check_range("max_components", max_components, low=1, integer=True, allow_none=True)
    cap = int(max_components) if max_components is not None else evr.size
    if noise_edge is not None:
        check_range("noise_edge", noise_edge, low=0)
        e = int((evr > noise_edge).sum())
        reason = (f"{e} of {evr.size} components above the signflip noise floor "
                  f"(explained variance ratio {noise_edge:.3g})")
        if e >= evr.size:
            reason += "; all computed components are above it: compute a longer scree"
    elif shape is not None:
        if len(shape) != 2 or min(shape) < 2:
            raise ParameterError(f"`shape` must be (N, P) with N, P >= 2 (got {shape!r})")
        e, edge = marchenko_pastur_count(evr, shape)
        reason = (f"{e} of {evr.size} components above the Marchenko-Pastur noise edge "
                  f"(explained variance ratio {edge:.3g})")
        if e >= evr.size:
            reason += "; all computed components are above it: compute a longer scree"
    else:
        e = _elbow(evr)
        reason = f"elbow of the log-scree (maximum distance below the chord) at {e}"
    if e > cap:
        reason += f"; capped at max_components={cap}"
    elif e < 1:
        reason += "; no signal found, using 1"
    return int(min(max(e, 1), cap)), reason
