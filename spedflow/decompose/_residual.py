"""Weak crystals the global NMF cannot see: a search of its residual on few pixels.

A small, weak crystal (e.g. 1 % of the dose over 40 of 4096 positions) carries less
energy in the Poisson-normalised matrix than the noise edge of the whole
(patterns x detector pixels) matrix: no global component can represent it, however
many are asked for. Its signal is concentrated, though, in a handful of detector
pixels (its spots) and in a compact group of scan positions. The noise edge of a
matrix grows with both dimensions (a rank-one spike of energy ``theta**2`` stands out
of unit noise when ``theta**2 > sqrt(N P)``, Baik, Ben Arous & Peche 2005), so the
search reduces the detector to the pixels where the residual is significant:

1. **Pixel screen** (one pass over the normalised matrix): the residual
   ``R = X - W H`` is summed over a small window of scan positions (crystals are
   compact in the scan, Poisson noise is independent from pattern to pattern) and
   divided by its Poisson standard deviation predicted by the model itself,
   ``var(x~_ij) = c (W H)_ij / (a_i b_j)``. ``c`` (the noise variance per Poisson
   count after alignment: below 1 because sub-pixel interpolation averages
   neighbouring pixels) is measured as ``sum R**2 / sum (W H) / (a b)`` in the same
   pass. Windows expecting fewer than ``min_counts`` counts are skipped (the normal
   approximation of a Poisson sum does not hold there). A pixel is kept when its
   largest window z-score exceeds the family-wise threshold for ``N x P`` tests at
   false-alarm probability ``alpha`` (Bonferroni, Gaussian tail).
2. **Residual sub-matrix** (one pass): ``R`` on the kept pixels, N x P' with P' the
   kept pixels (tens to a few hundred, against ~1e4 detector pixels).
3. Its rank is the number of singular values above those of copies in which each
   pixel's scan image is shifted at random (:func:`shift_null_rank`): the pixels of
   a crystal vary together, noise selected by the screen does not; the new components come from a HALS NMF of the
   (signed) residual with non-negative factors, the global ones held fixed.
4. **Friedel test of every piece** (no pass): each connected piece of a new
   component's significant loading is a candidate crystal. Its summed residual on
   each cluster of kept detector pixels is z-scored with the Poisson variance of the
   model (the same statistic as the screen, over the piece's own positions), and the
   piece is kept only when two significant clusters sit at ``g`` and ``-g`` about the
   beam (Friedel's law, nearly exact under precession; the VDF workflow's
   ``friedel_tolerance`` rule). Noise bumps picked by the screen, and misfits of the
   direct beam or of the detector edge, have no reason to respect that symmetry.
5. **Full patterns** (one pass): the new components' patterns on every detector pixel
   from ``W2^T (X - W H)`` by HALS, the loadings fixed.

New components then go through the same classification, merging and watershed as
the global ones; the workflow sets aside one that corrects a crystal already found
(:func:`is_correction`). Kernels here are pure NumPy on one block.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from .._friedel import has_friedel_pair as friedel_pair
from ..config import check_range
from ..errors import ParameterError

__all__ = ["ResidualParams", "residual_screen_block", "merge_screens", "screen_threshold",
           "residual_rows_block", "shift_null_rank", "residual_nmf", "residual_patterns_block",
           "fit_patterns", "significant_loadings", "cluster_z", "has_friedel_pair", "is_correction"]

_TINY = 1e-12


@dataclass(frozen=True)
class ResidualParams:
    """Search of the NMF residual for weak crystals (see the module docstring).

    enabled : bool, default True
        Run the search (three passes over the normalised matrix).
    window : int, default 3
        Side of the square window of scan positions over which the residual is
        summed (odd). 3 gains a factor 3 in signal-to-noise for any crystal at least
        3 positions across, i.e. any crystal the watershed keeps (``min_size`` 10).
    alpha : float, default 0.01
        Probability that pure noise puts one pixel through the screen (family-wise,
        over all N x P windows).
    min_counts : float, default 10
        Windows expecting fewer counts (sum over window of the model) are skipped.
        Detector counts: the workflow divides the model, in data units, by the
        detector's measured gain (1 where the data cannot tell it), so a camera's
        units do not move the limit.
    max_pixels : int, default 512
        At most this many pixels (the most significant) enter the sub-matrix; fewer on
        scans so large that positions x pixels x 4 B would exceed 128 MB.
    max_components : int, default 8
        Upper bound on the new components.
    friedel_tolerance : float, default 1.0
        Two significant clusters of kept pixels at ``g1``, ``g2`` (weighted
        centroids, detector px from the beam centre) are a Friedel pair when
        ``|g1 + g2|`` is at most this; a piece of a new component without one is
        dropped (see the module docstring). 1.0 px as in the VDF workflow.
    """

    enabled: bool = True
    window: int = 3
    alpha: float = 0.01
    min_counts: float = 10.0
    max_pixels: int = 512
    max_components: int = 8
    friedel_tolerance: float = 1.0

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ParameterError(f"`enabled` must be true or false (got {self.enabled!r})")
        check_range("window", self.window, low=1, high=15, integer=True)
        if self.window % 2 != 1:
            raise ParameterError(f"`window` must be odd (got {self.window})")
        check_range("alpha", self.alpha, low=0, high=1, low_open=True, high_open=True)
        check_range("min_counts", self.min_counts, low=0)
        check_range("max_pixels", self.max_pixels, low=1, integer=True)
        check_range("max_components", self.max_components, low=1, integer=True)
        check_range("friedel_tolerance", self.friedel_tolerance, low=0, low_open=True)


#: Target size of one float64 temporary of the pixel screen (one slice of detector pixels).
_SCREEN_SLICE_BYTES = 8 * 2**20


def _box_sum(v: np.ndarray, k: int) -> np.ndarray:
    """Sum over a k x k window of the first two axes ('valid' part: shrinks by k-1).

    Separable sums of shifted views: 2 (k - 1) in-place additions. For the windows
    allowed (k <= 15) that is faster than a summed-area table (two cumulative sums
    along the outer axes: 12x slower at k = 3 on a 26 x 26 x 1500 block) and exact.
    """
    n0, n1 = v.shape[0] - k + 1, v.shape[1] - k + 1
    if n0 <= 0 or n1 <= 0:
        return np.zeros((max(n0, 0), max(n1, 0)) + v.shape[2:], np.result_type(v, np.float64))
    rows = np.array(v[:n0], np.result_type(v, np.float64))
    for i in range(1, k):
        rows += v[i:i + n0]
    out = rows[:, :n1].copy()
    for i in range(1, k):
        out += rows[:, i:i + n1]
    return out


def residual_screen_block(x, w, h, a, b, *, window: int, min_counts: float):
    """Screen statistics of one block (with a halo of ``window // 2`` positions).

    Parameters
    ----------
    x : (y, x, P) normalised data with halo (zeros outside the scan).
    w : (y, x, E) normalised loadings on the same positions; h : (E, P) factors.
    a : (y, x) row scales (0 outside the scan); b : (P,) column scales.

    Returns
    -------
    dict: ``score`` (P,) largest ``sum R / sqrt(sum V)`` over the block's windows
    (centres in the block's core), ``rr`` sum of R**2 and ``vv`` sum of V over the
    core positions (for the noise factor ``c``).
    """
    x = np.asarray(x)
    ny, nx, p = x.shape
    w2 = np.asarray(w, np.float64).reshape(ny * nx, -1)
    h = np.asarray(h, np.float64)
    a = np.asarray(a, np.float64)[..., None]
    b = np.asarray(b, np.float64)
    hw = window // 2
    core = (slice(hw, ny - hw), slice(hw, nx - hw))
    best = np.full(p, -np.inf)
    rr = vv = 0.0
    # detector pixels in slices: ~20 float64 temporaries of (ny, nx, step) live at once
    # (the residual, the variance, the counts, their window sums), so each is kept near
    # _SCREEN_SLICE_BYTES; a whole 22 x 23 block of 16,384-pixel patterns at once was
    # ~80 MB each and killed 1 GB workers
    step = max(64, _SCREEN_SLICE_BYTES // (8 * max(ny * nx, 1)))
    for j0 in range(0, p, step):
        sl = slice(j0, min(p, j0 + step))
        model = (w2 @ h[:, sl]).reshape(ny, nx, -1)
        r = x[..., sl] - model
        np.maximum(model, 0.0, out=model)
        ab = a * b[sl]
        v = np.divide(model, ab, out=np.zeros_like(model), where=ab > 0)
        model *= ab  # expected counts
        sr, sv, sc = (_box_sum(t, window) for t in (r, v, model))
        score = np.where((sc >= min_counts) & (sv > 0), sr / np.sqrt(np.maximum(sv, _TINY)), -np.inf)
        if score.size:
            best[sl] = score.reshape(-1, score.shape[-1]).max(axis=0)
        rr += float(np.sum(r[core] ** 2))
        vv += float(np.sum(v[core]))
    return {"score": best, "rr": np.array(rr), "vv": np.array(vv)}


def merge_screens(*parts):
    """Associative merge of screen statistics (max of scores, sums of rr and vv)."""
    out = {"score": parts[0]["score"].copy(), "rr": float(parts[0]["rr"]), "vv": float(parts[0]["vv"])}
    for q in parts[1:]:
        np.maximum(out["score"], q["score"], out=out["score"])
        out["rr"] += float(q["rr"])
        out["vv"] += float(q["vv"])
    return out


def screen_threshold(n_tests: int, alpha: float) -> float:
    """z such that N(0,1) exceeds it with probability ``alpha / n_tests`` (Bonferroni)."""
    return float(-NormalDist().inv_cdf(alpha / max(int(n_tests), 1)))


def residual_rows_block(x, w, h, sel):
    """``X - W H`` of one block on the selected pixels: (n, P') float32."""
    x = np.asarray(x)
    n = int(np.prod(x.shape[:-1]))
    xs = x.reshape(n, -1)[:, sel].astype(np.float64)
    return (xs - np.asarray(w, np.float64).reshape(n, -1) @ np.asarray(h, np.float64)[:, sel]).astype(np.float32)


def shift_null_rank(r: np.ndarray, scan_shape: tuple[int, int], groups: np.ndarray | None = None, *,
                    n_draws: int = 5, seed: int = 0,
                    max_rank: int | None = None) -> tuple[int, np.ndarray, float]:
    """Number of singular values of ``r`` above those of column-wise shifted copies.

    ``r`` (N, P') holds one scan image per column. The null shifts each column's
    image by its own random offset on the torus of the scan: every column keeps its
    spatial structure (including the noise bumps that put it through the screen:
    the winner's curse of selecting pixels by their largest window) and its value
    distribution, but columns no longer vary *together*. A crystal lights several
    pixels (its spots) at the same positions, so it stands above the null; a pixel
    selected for a noise bump does not. The floor is the largest top singular value
    of ``n_draws`` shifted copies.

    ``groups`` (P',) gives each column a group (e.g. the connected cluster of detector
    pixels it belongs to): columns of one group are shifted together, so noise that
    is correlated between neighbouring detector pixels (sub-pixel alignment spreads
    each count over neighbours) stays correlated in the null. A crystal must then
    vary together over several spots (at least a Friedel pair), not inside one.
    """
    r = np.asarray(r)
    ny, nx = scan_shape
    img = r.reshape(ny, nx, -1)
    s = _singular_values(r)
    rng = np.random.default_rng(seed)
    null = 0.0
    for _ in range(n_draws):
        g = np.arange(img.shape[-1]) if groups is None else np.asarray(groups)
        dy = rng.integers(0, ny, size=int(g.max()) + 1)[g]
        dx = rng.integers(0, nx, size=int(g.max()) + 1)[g]
        yy = (np.arange(ny)[:, None, None] + dy[None, None, :]) % ny
        xx = (np.arange(nx)[None, :, None] + dx[None, None, :]) % nx
        shifted = img[yy, xx, np.arange(img.shape[-1])[None, None, :]]
        null = max(null, float(_singular_values(shifted.reshape(ny * nx, -1))[0]))
    k = int((s > null).sum())
    if max_rank is not None:
        k = min(k, int(max_rank))
    return k, s, null


def _singular_values(m: np.ndarray, rows: int = 65536) -> np.ndarray:
    """Singular values (descending) of a tall ``m`` from its float64 Gram matrix,
    accumulated over row blocks: no float64 copy of ``m``, no ``U``."""
    g = np.zeros((m.shape[1], m.shape[1]))
    for i in range(0, m.shape[0], rows):
        part = np.asarray(m[i:i + rows], np.float64)
        g += part.T @ part
    return np.sqrt(np.maximum(np.linalg.eigvalsh(g)[::-1], 0.0))


def residual_nmf(r: np.ndarray, k: int, *, max_iter: int = 500, tol: float = 1e-5, seed: int = 0):
    """Non-negative ``W2 (n, k)``, ``H2 (k, P')`` minimising ``||r - W2 H2||`` (r signed).

    HALS (exact coordinate minimisation clipped at 0) from the positive parts of the
    leading singular vectors (NNDSVD).
    """
    r = np.asarray(r, np.float64)
    u, s, vt = np.linalg.svd(r, full_matrices=False)
    w = np.zeros((r.shape[0], k))
    h = np.zeros((k, r.shape[1]))
    for j in range(k):
        x, y = u[:, j], vt[j]
        xp, yp, xn, yn = np.maximum(x, 0), np.maximum(y, 0), np.maximum(-x, 0), np.maximum(-y, 0)
        if np.linalg.norm(xp) * np.linalg.norm(yp) >= np.linalg.norm(xn) * np.linalg.norm(yn):
            uu, vv = xp, yp
        else:
            uu, vv = xn, yn
        lam = np.sqrt(s[j] * np.linalg.norm(uu) * np.linalg.norm(vv))
        w[:, j] = lam * uu / max(np.linalg.norm(uu), _TINY)
        h[j] = lam * vv / max(np.linalg.norm(vv), _TINY)
    prev = np.inf
    rsq = float(np.sum(r ** 2))
    for _ in range(max_iter):
        rht, hht = r @ h.T, h @ h.T
        for j in range(k):
            w[:, j] = np.maximum(w[:, j] + (rht[:, j] - w @ hht[:, j]) / max(hht[j, j], _TINY), 0)
        wtr, wtw = w.T @ r, w.T @ w
        for j in range(k):
            h[j] = np.maximum(h[j] + (wtr[j] - wtw[j] @ h) / max(wtw[j, j], _TINY), 0)
        loss = rsq - 2 * np.sum(wtr * h) + np.sum(wtw * (h @ h.T))
        if prev - loss < tol * max(rsq, _TINY):
            break
        prev = loss
    return w, h


def significant_loadings(r: np.ndarray, h: np.ndarray, scan_shape: tuple[int, int],
                         window: int, alpha: float) -> np.ndarray:
    """Loadings of the residual components where they stand out of their noise.

    The unconstrained least-squares loadings ``r @ pinv(h)`` have noise symmetric
    about 0 away from the crystal, measured robustly (1.4826 x MAD) per component.
    As in the pixel screen, a position is a crystal's core when the loading summed
    over the ``window`` x ``window`` window around it exceeds the Bonferroni level
    for N windows at ``alpha``; the loading (clipped at 0) is kept within a window of
    a core and set to 0 elsewhere, so a component's noise cannot seed segments.
    """
    from scipy import ndimage
    ny, nx = scan_shape
    wls = np.asarray(r, np.float64) @ np.linalg.pinv(np.asarray(h, np.float64))
    out = np.zeros_like(wls)
    thr = screen_threshold(ny * nx, alpha)
    for j in range(wls.shape[1]):
        v = wls[:, j].reshape(ny, nx)
        sigma = 1.4826 * float(np.median(np.abs(v - np.median(v))))
        if sigma <= 0:
            continue
        hw = window // 2
        sums = _box_sum(np.pad(v, hw), window)
        core = sums / (window * sigma) > thr
        if not core.any():
            continue
        support = ndimage.binary_dilation(core, structure=np.ones((window, window), bool))
        out[:, j] = (np.maximum(v, 0) * support).ravel()
    return out


def residual_patterns_block(x, w, h, w2):
    """``W2^T (X - W H)`` of one block: (k, P) float64 (summed over blocks)."""
    x = np.asarray(x, np.float64)
    n = int(np.prod(x.shape[:-1]))
    x = x.reshape(n, -1)
    w2 = np.asarray(w2, np.float64).reshape(n, -1)
    r = x - np.asarray(w, np.float64).reshape(n, -1) @ np.asarray(h, np.float64)
    return w2.T @ r


def fit_patterns(a: np.ndarray, b: np.ndarray, h0: np.ndarray, sweeps: int = 50) -> np.ndarray:
    """HALS for non-negative H2 given ``A = W2^T R`` (k, P) and ``B = W2^T W2`` (k, k)."""
    h = np.maximum(np.array(h0, np.float64, copy=True), 0)
    for _ in range(sweeps):
        for j in range(h.shape[0]):
            h[j] = np.maximum(h[j] + (a[j] - b[j] @ h) / max(b[j, j], _TINY), 0.0)
    return h


def cluster_z(r_sum: np.ndarray, v_sum: np.ndarray, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z-score of the residual summed over a piece's positions and each pixel cluster.

    ``r_sum`` (P',) is ``X - W H`` summed over the piece's positions, ``v_sum`` (P',)
    its Poisson variance (``c (W H) / (a b)`` summed likewise). Returns the cluster
    labels and their z = sum r / sqrt(sum v): the pixel screen's statistic, on the
    piece's own positions instead of a fixed window.
    """
    labels, inv = np.unique(np.asarray(clusters), return_inverse=True)
    rs = np.bincount(inv, weights=np.asarray(r_sum, np.float64), minlength=len(labels))
    vs = np.bincount(inv, weights=np.asarray(v_sum, np.float64), minlength=len(labels))
    z = np.divide(rs, np.sqrt(np.maximum(vs, 0)), out=np.full(len(labels), -np.inf), where=vs > 0)
    return labels, z


def has_friedel_pair(r_sum: np.ndarray, v_sum: np.ndarray, clusters: np.ndarray,
                     coords: np.ndarray, centre, z_threshold: float, tolerance: float) -> bool:
    """Whether two clusters significant over a piece sit at ``g`` and ``-g`` about the beam.

    ``coords`` (P', 2) are the kept pixels' detector positions, ``centre`` the beam
    centre. A cluster is significant when :func:`cluster_z` exceeds ``z_threshold``;
    its position is the centroid of its pixels weighted by the positive summed
    residual (the spot's centre). A crystal's reflections come in Friedel pairs, so
    its piece shows (at least) one; a noise bump or a one-sided misfit (beam tail,
    detector edge) does not (:func:`spedflow._friedel.has_friedel_pair`).
    """
    labels, z = cluster_z(r_sum, v_sum, clusters)
    cl = np.asarray(clusters)
    g = []
    for lab in labels[z > z_threshold]:
        on = cl == lab
        wt = np.maximum(np.asarray(r_sum, np.float64)[on], 0) + _TINY
        g.append(np.average(np.asarray(coords, np.float64)[on], axis=0, weights=wt) - np.asarray(centre))
    return friedel_pair(np.array(g).reshape(-1, 2), tolerance)


def is_correction(load_new: np.ndarray, pat_new: np.ndarray, load_host: np.ndarray,
                  pat_host: np.ndarray, level: float = 0.1) -> tuple[bool, float, float]:
    """Whether a new component corrects a crystal already found rather than being one.

    ``load_*`` are loading maps (any shape, same for both), ``pat_new`` the new
    component's pattern on the kept pixels and ``pat_host`` the host's pattern on the
    same pixels divided by the maximum of its *full* pattern. A misfit of a
    crystal (thickness, shape, excitation across it) leaves a residual where the
    crystal is and on the crystal's own spots; a weak crystal inside a strong one
    sits where the host is too, but on other spots. The new component is a
    correction when most (> 1/2) of its support lies where the host is present
    (above ``level`` of its maximum, the coverage level of the classifier) *and*
    most of its kept-pixel pattern lies on the host's spots (above ``level``).
    Returns the verdict, the positional overlap and the spot overlap.
    """
    sup = np.asarray(load_new) > 0
    lh = np.asarray(load_host, np.float64)
    if not sup.any() or lh.max() <= 0:
        return False, 0.0, 0.0
    overlap = float((lh[sup] > level * lh.max()).mean())
    p = np.maximum(np.asarray(pat_new, np.float64), 0)
    spots = float(p[np.asarray(pat_host) > level].sum() / max(p.sum(), _TINY))
    return (overlap > 0.5 and spots > 0.5), overlap, spots
