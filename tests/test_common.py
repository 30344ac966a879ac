"""Kernels of the workflow layer against brute force."""

import numpy as np
import pytest

from spedflow.workflows._common import annular_image, radial_profiles


@pytest.mark.parametrize("shape", [(3, 4, 32, 32), (5, 24, 40)])
def test_radial_profiles_equal_a_brute_force_loop(shape):
    rng = np.random.default_rng(1)
    frames = rng.poisson(3.0, shape).astype(np.float32)
    ky, kx = shape[-2:]
    centres = np.stack([rng.uniform(5, ky - 5, shape[:-2]), rng.uniform(5, kx - 5, shape[:-2])], -1)
    centres.reshape(-1, 2)[0] = np.nan  # no beam found: the detector centre is used
    n_bins = 20
    got = radial_profiles(frames, centres, n_bins)
    assert got.shape == shape[:-2] + (n_bins,)
    yy, xx = np.mgrid[:ky, :kx]
    for f, c, g in zip(frames.reshape(-1, ky, kx), centres.reshape(-1, 2), got.reshape(-1, n_bins)):
        c = np.where(np.isfinite(c), c, [ky // 2, kx // 2])
        r = np.hypot(yy - np.rint(c[0]), xx - np.rint(c[1]))
        ref = [f[(r >= i) & (r < i + 1)].sum() for i in range(n_bins)]
        np.testing.assert_allclose(g, ref, rtol=1e-6)
    # the annular image sums the rings it is asked for
    np.testing.assert_allclose(annular_image(got, 3, 9), got[..., 3:9].sum(-1), rtol=1e-6)
