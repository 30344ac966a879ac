"""Watershed kernel, segments, lazy wrapper: against skimage, synthetic truth, brute force."""

import dataclasses
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from skimage.draw import disk as draw_disk
from skimage.feature import peak_local_max
from skimage.filters import sobel, threshold_li
from skimage.morphology import disk
from skimage.segmentation import watershed

from spedflow.errors import InputError, ParameterError
from spedflow.segment import (WatershedParams, segments_from_labels, watershed_image,
                              watershed_stack)


@pytest.fixture(autouse=True)
def _synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


def assert_equivalent_labeling(a, b):
    """Labels equal up to a permutation of the non-zero label values."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.array_equal(a == 0, b == 0)
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    assert np.unique(pairs[0]).size == pairs.shape[1]
    assert np.unique(pairs[1]).size == pairs.shape[1]


def disc_mask(shape, centre, radius):
    m = np.zeros(shape, bool)
    m[draw_disk(centre, radius, shape=shape)] = True
    return m


def square_mask(shape, top_left, side):
    m = np.zeros(shape, bool)
    m[top_left[0]:top_left[0] + side, top_left[1]:top_left[1] + side] = True
    return m


def render(masks, levels, noise=0.03, blur=0.7, seed=0):
    """VDF-like image: crystals add up where they overlap, probe blur, Gaussian noise."""
    img = sum(level * m.astype(float) for m, level in zip(masks, levels))
    img = ndi.gaussian_filter(img, blur) if blur else img
    return img + np.random.default_rng(seed).normal(0, noise * max(levels), img.shape)


def iou_matching(labels, masks):
    """Best one-to-one IoU of each truth mask with a segment."""
    seg = [labels == k for k in range(1, labels.max() + 1)]
    iou = np.array([[(s & t).sum() / (s | t).sum() for s in seg] for t in masks])
    rows, cols = linear_sum_assignment(-iou)
    return iou[rows, cols]


# -- against a direct skimage pipeline --------------------------------------------------

def skimage_reference(image, min_distance, min_size, marker_radius):
    """The paper's recipe written straight with skimage (no marker merging needed)."""
    mask = image > threshold_li(image)
    dist = ndi.distance_transform_edt(mask)
    comp, _ = ndi.label(mask)
    peaks = peak_local_max(dist, min_distance=min_distance, labels=comp, exclude_border=False)
    markers = np.zeros(image.shape, int)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    markers = ndi.grey_dilation(markers, footprint=disk(marker_radius)) * mask
    labels = watershed(sobel(image), markers, mask=mask)
    sizes = np.bincount(labels.ravel())
    labels[sizes[labels] < min_size] = 0
    return labels


def test_equals_skimage_pipeline():
    shape = (60, 64)
    masks = [disc_mask(shape, (15, 15), 8), disc_mask(shape, (15, 30), 8),  # touching pair
             disc_mask(shape, (42, 20), 6), disc_mask(shape, (40, 48), 9)]
    image = render(masks, [1.0, 0.7, 1.3, 0.9], noise=0, blur=0)
    ref = skimage_reference(image, min_distance=5, min_size=10, marker_radius=2)
    assert ref.max() == 4  # the pair is split by both
    ours = watershed_image(image, WatershedParams(min_size=10, marker_radius=2))
    assert_equivalent_labeling(ours, ref)


# -- synthetic crystals of known shape --------------------------------------------------

SHAPE = (64, 64)
CASES = {
    "two touching discs": ([disc_mask(SHAPE, (30, 22), 9), disc_mask(SHAPE, (30, 40), 9)],
                           [1.0, 0.6]),
    "overlapping discs": ([disc_mask(SHAPE, (30, 22), 10), disc_mask(SHAPE, (32, 41), 9)],
                          [1.0, 1.0]),
    "disc and square": ([disc_mask(SHAPE, (20, 20), 9), square_mask(SHAPE, (24, 29), 16)],
                        [0.8, 1.0]),
    "two overlapping squares": ([square_mask(SHAPE, (10, 10), 18), square_mask(SHAPE, (25, 25), 18)],
                                [1.0, 0.9]),
    "four crystals": ([disc_mask(SHAPE, (14, 14), 8), disc_mask(SHAPE, (14, 30), 7),
                       square_mask(SHAPE, (34, 10), 14), disc_mask(SHAPE, (45, 42), 10)],
                      [1.0, 0.5, 0.8, 1.2]),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_touching_crystals(name, seed):
    masks, levels = CASES[name]
    labels = watershed_image(render(masks, levels, seed=seed))
    assert labels.max() == len(masks), name
    assert iou_matching(labels, masks).min() > 0.8


@pytest.mark.parametrize("mask", [
    square_mask(SHAPE, (10, 10), 30),
    np.pad(np.ones((8, 40), bool), ((20, 36), (12, 12))),           # long rectangle: a ridge
    np.fromfunction(lambda y, x: ((y - 32) / 10) ** 2 + ((x - 32) / 25) ** 2 <= 1, SHAPE),
    disc_mask(SHAPE, (32, 32), 14),
], ids=["square", "rectangle", "ellipse", "disc"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_crystal_not_split(mask, seed):
    labels = watershed_image(render([mask], [1.0], noise=0.08, seed=seed))
    assert labels.max() == 1
    assert iou_matching(labels, [mask])[0] > 0.8


def test_labels_int32_consecutive_and_deterministic():
    masks, levels = CASES["four crystals"]
    image = render(masks, levels)
    a = watershed_image(image)
    assert a.dtype == np.int32 and a.shape == image.shape
    assert set(np.unique(a)) == set(range(a.max() + 1))
    assert np.array_equal(a, watershed_image(image))


@pytest.mark.parametrize("image", [np.zeros((20, 30)), np.full((20, 30), 7.5),
                                   np.zeros((1, 1)), np.ones((5, 5), np.uint16)])
def test_empty_and_constant_images(image):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels = watershed_image(image)
    assert labels.shape == image.shape and labels.max() == 0


def _li_cases():
    rng = np.random.default_rng(3)
    masks, levels = CASES["two touching discs"]
    blobs = render(masks, levels)
    return {"crystals and noise": blobs + rng.normal(0, 0.05, blobs.shape),
            "crystals, blurred": ndi.gaussian_filter(blobs, 2.0),
            "normal": rng.normal(size=(50, 60)), "counts": rng.poisson(3, (40, 40)) * 1.0,
            "exponential": rng.exponential(size=(64, 64)),
            "two values": np.r_[np.zeros(10), np.ones(5)].reshape(3, 5),
            "float32 steps": (rng.integers(0, 7, (30, 30)) * 0.1).astype(np.float32),
            "negative": -rng.gamma(2.0, size=(25, 25)), "constant": np.full((4, 4), 2.5)}


@pytest.mark.parametrize("name", list(_li_cases()))
def test_li_threshold_equals_skimage(name):
    from spedflow.segment._watershed import _threshold_li
    image = _li_cases()[name].astype(np.float64)  # as watershed_image passes it
    ours, ref = _threshold_li(image), threshold_li(image)
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-300)
    np.testing.assert_array_equal(image > ours, image > ref)


def test_otsu_threshold():
    masks, levels = CASES["two touching discs"]
    labels = watershed_image(render(masks, levels), WatershedParams(threshold="otsu"))
    assert labels.max() == 2 and iou_matching(labels, masks).min() > 0.75


def test_min_size_drops_small_segments():
    masks = [disc_mask(SHAPE, (20, 20), 8), square_mask(SHAPE, (45, 45), 3)]  # 9 px square
    image = render(masks, [1.0, 1.0], noise=0, blur=0)
    assert watershed_image(image, WatershedParams(min_size=9)).max() == 2
    labels = watershed_image(image, WatershedParams(min_size=10))
    assert labels.max() == 1 and iou_matching(labels, masks[:1])[0] > 0.9


def test_exclude_border_drops_edge_crystal_without_leak():
    masks = [disc_mask(SHAPE, (32, 0), 9), disc_mask(SHAPE, (32, 17), 9)]  # left one at the edge
    image = render(masks, [1.0, 1.0], noise=0.01)
    labels = watershed_image(image, WatershedParams(exclude_border=2))
    assert labels.max() == 1
    assert iou_matching(labels, masks[1:])[0] > 0.8
    assert watershed_image(image).max() == 2


def test_min_intensity_relative_to_scale():
    masks = [disc_mask(SHAPE, (20, 20), 8), disc_mask(SHAPE, (45, 45), 8)]
    image = render(masks, [1.0, 0.2], noise=0.01)
    assert watershed_image(image, WatershedParams(min_intensity=0.1)).max() == 2
    assert watershed_image(image, WatershedParams(min_intensity=0.5)).max() == 1
    # scale-free: multiplying the data does not change the answer
    np.testing.assert_array_equal(watershed_image(image * 1e4, WatershedParams(min_intensity=0.5)),
                                  watershed_image(image, WatershedParams(min_intensity=0.5)))
    # against an explicit stack level, both are faint
    assert watershed_image(image, WatershedParams(min_intensity=0.5), intensity_scale=10).max() == 0


def test_noise_only_image_in_a_stack_gives_no_segments():
    rng = np.random.default_rng(3)
    crystal = render([disc_mask(SHAPE, (30, 30), 10)], [100.0], noise=0.0) + rng.poisson(2.0, SHAPE)
    noise = rng.poisson(2.0, SHAPE).astype(float)   # a VDF image of a spurious vector
    stack = np.stack([crystal, noise])
    params = WatershedParams(min_intensity=0.2)
    labels = watershed_stack(da.from_array(stack, chunks=1), params).compute()
    assert labels[0].max() == 1 and labels[1].max() == 0
    assert watershed_image(noise).max() > 0  # without the relative level, noise segments


# -- segments_from_labels ---------------------------------------------------------------

def test_segments_from_labels_brute_force():
    rng = np.random.default_rng(0)
    images = rng.random((3, 9, 11)).astype(np.float32) + 0.1
    labels = rng.choice([0, 1, 4, 7], size=images.shape)   # non-consecutive labels
    labels[1] = 0                                           # an image without segments
    segs, source = segments_from_labels(images, labels)
    expect, expect_src = [], []
    for n in range(3):
        for k in np.unique(labels[n]):
            if k:
                expect.append(np.where(labels[n] == k, images[n], 0))
                expect_src.append(n)
    assert segs.dtype == np.float32 and source.tolist() == expect_src
    np.testing.assert_array_equal(segs, np.array(expect))
    assert np.all((segs != 0) <= (labels[source] > 0))


@pytest.mark.parametrize("sparse", [False, True])
def test_segments_from_labels_reads_zarr_stacks_in_batches(tmp_path, sparse):
    """Stacks too large for memory come as zarr arrays, read a few images at a time:
    the same segments, in the same order, as from the NumPy arrays in one go."""
    import zarr
    rng = np.random.default_rng(1)
    images = rng.random((7, 9, 11)).astype(np.float32) + 0.1
    labels = rng.choice([0, 0, 2, 3, 9], size=images.shape).astype(np.int32)
    labels[4] = 0
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    zi = g.create_array("images", shape=images.shape, chunks=(1, 9, 11), dtype=images.dtype)
    zl = g.create_array("labels", shape=labels.shape, chunks=(2, 9, 11), dtype=labels.dtype)
    zi[...] = images
    zl[...] = labels
    want, want_src = segments_from_labels(images, labels, sparse=sparse)
    # 3 images of labels per batch: batches 0-2, 3-5, 6
    got, got_src = segments_from_labels(zi, zl, sparse=sparse, batch_bytes=3 * 9 * 11 * 4)
    np.testing.assert_array_equal(got_src, want_src)
    dense = (lambda a: a.toarray()) if sparse else np.asarray
    np.testing.assert_array_equal(dense(got), dense(want))
    assert want_src.size == sum(np.unique(lab[lab > 0]).size for lab in labels)


def test_segments_from_labels_empty():
    segs, source = segments_from_labels(np.ones((2, 4, 5)), np.zeros((2, 4, 5), int))
    assert segs.shape == (0, 4, 5) and source.shape == (0,)


# -- lazy == kernel ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack():
    return np.stack([render(*CASES[name], seed=i) for i, name in enumerate(CASES)]).astype(np.float32)


@pytest.mark.parametrize("chunks", [(1, 64, 64), (2, 13, 64), (5, 64, 64), (3, 30, 17)])
@pytest.mark.parametrize("min_intensity", [0.0, 0.6])
def test_lazy_equals_kernel(stack, chunks, min_intensity):
    params = WatershedParams(min_intensity=min_intensity)
    lazy = watershed_stack(da.from_array(stack, chunks=chunks), params)
    assert lazy.dtype == np.int32 and lazy.chunks[1:] == ((64,), (64,))
    assert all(c == 1 for c in lazy.chunks[0])
    got = lazy.compute()
    expect = np.stack([watershed_image(im, params, intensity_scale=stack.max()) for im in stack])
    np.testing.assert_array_equal(got, expect)


def test_lazy_explicit_scale(stack):
    params = WatershedParams(min_intensity=0.5)
    got = watershed_stack(da.from_array(stack), params, intensity_scale=1e9).compute()
    assert got.max() == 0


# -- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"threshold": "yen"}, "threshold"),
    ({"min_size": 0}, "min_size"),
    ({"min_size": 2.5}, "min_size"),
    ({"neck_ratio": 0}, "neck_ratio"),
    ({"neck_ratio": 1.5}, "neck_ratio"),
    ({"min_distance": -1}, "min_distance"),
    ({"marker_radius": -1}, "marker_radius"),
    ({"exclude_border": 1.5}, "exclude_border"),
    ({"min_intensity": 1.5}, "min_intensity"),
    ({"min_intensity": float("nan")}, "min_intensity"),
])
def test_bad_params(kwargs, match):
    with pytest.raises(ParameterError, match=match):
        WatershedParams(**kwargs)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: watershed_image(np.zeros((3, 4, 5))), InputError, "2-D"),
    (lambda: watershed_image(np.array([[1.0, np.nan]])), InputError, "NaN"),
    (lambda: watershed_image(np.array([["a"]])), InputError, "numeric"),
    (lambda: segments_from_labels(np.zeros((2, 3, 3)), np.zeros((2, 3, 4), int)), InputError,
     "shape"),
    (lambda: segments_from_labels(np.zeros((2, 3, 3)), np.zeros((2, 3, 3))), InputError,
     "integers"),
    (lambda: segments_from_labels(np.zeros((3, 3)), np.zeros((3, 3), int)), InputError, "3-D"),
    (lambda: watershed_stack(np.zeros((2, 3, 3))), InputError, "dask array"),
    (lambda: watershed_stack(da.zeros((3, 3))), InputError, "3-D"),
    (lambda: watershed_stack(da.zeros((2, 3, 3)), intensity_scale="x"), ParameterError,
     "intensity_scale"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_min_snr_drops_noise_level_blobs_and_keeps_crystals():
    """The loading map of a spare NMF component: non-negative noise with a few blobs a
    few noise levels high, which Li's threshold lets through. With min_snr they are
    dropped; a crystal on the same noise is kept."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:48, :48]
    blobs = [(8, 38), (40, 8), (26, 42), (20, 20)]
    noise_map = np.abs(rng.normal(0, 0.01, (48, 48)))
    spare = noise_map.copy()
    for y, x in blobs:
        spare[np.hypot(yy - y, xx - x) < 3] += 0.03
    loose = WatershedParams(min_size=5, marker_radius=1)
    strict = WatershedParams(min_size=5, marker_radius=1, min_snr=10)
    lab = watershed_image(spare, loose)
    assert all(lab[y, x] > 0 for y, x in blobs)  # Li alone keeps them
    mad_sigma = 1.4826 * np.median(np.abs(spare - np.median(spare)))
    assert all(spare[lab == k].max() < 10 * mad_sigma for k in range(1, lab.max() + 1))
    assert watershed_image(spare, strict).max() == 0
    crystal = noise_map.copy()
    disc = np.hypot(yy - 24, xx - 24) < 8
    crystal[disc] += 0.5
    np.testing.assert_array_equal(watershed_image(crystal, strict) > 0,
                                  watershed_image(crystal, loose) > 0)
    assert (watershed_image(crystal, strict) > 0)[disc].mean() > 0.9


def test_min_snr_drops_pedestal_segments_by_their_median():
    """A segment cut from a pedestal (film mixed into an NMF component) whose peak is a
    crystal's edge value passes the peak test, but its median is ~1 noise level over
    the rest of the map: dropped. A crystal covering most of the scan, whose level is
    the whole map's median, is kept (its median is compared with the rest)."""
    from spedflow.segment._watershed import _filter_segments, _typical_above_rest
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:48, :48]
    image = np.abs(rng.normal(0, 0.01, (48, 48)))
    noise = 1.4826 * np.median(np.abs(image - np.median(image)))
    flooded = np.zeros((48, 48), np.int32)
    crystal = np.hypot(yy - 12, xx - 12) < 7
    flooded[crystal], image[crystal] = 1, image[crystal] + 0.5
    pedestal = (yy > 24) & (xx > 8)
    image[pedestal] += 1.0 * noise
    image[40, 30] = 0.5  # the edge of a crystal the pedestal swallowed
    flooded[pedestal] = 2
    p = WatershedParams(min_size=5, marker_radius=1, min_snr=10)
    kept = _filter_segments(image, flooded, set(), p, None, noise, noise)
    np.testing.assert_array_equal(kept > 0, crystal)  # the pedestal went, the crystal stayed
    loose = _filter_segments(image, flooded, set(), dataclasses.replace(p, min_snr=0), None, 0.0, 0.0)
    assert set(np.unique(loose)) == {0, 1, 2}
    # a crystal over 60 % of the scan, cut into two segments: each stands ~0.5 above the
    # rest of the map, where the whole map's median (the crystal's own level) gives ~0
    big = np.abs(rng.normal(0, 0.01, (48, 48)))
    cover = xx < 29
    big[cover] += 0.5 + 0.05 * np.sin(yy[cover] / 5.0)
    halves = np.zeros((48, 48), np.int32)
    halves[cover & (yy < 24)], halves[cover & (yy >= 24)] = 1, 2
    above = _typical_above_rest(big, halves, np.array([True, True]))
    brute = [np.median(big[halves == k]) - np.median(big[halves != k]) for k in (1, 2)]
    np.testing.assert_allclose(above, brute)
    assert above.min() > 0.4 and abs(np.median(big[halves == 1]) - np.median(big)) < 0.1


def test_min_snr_is_checked():
    with pytest.raises(ParameterError, match="min_snr"):
        WatershedParams(min_snr=-1)


def test_noisy_large_crystal_is_one_segment():
    """A crystal ~170 scan px across in counting noise: the mask is riddled with holes
    and one-pixel bridges; unsmoothed (the paper's recipe) the watershed cuts it into
    hundreds of pieces, the automatic smoothing keeps it whole."""
    rng = np.random.default_rng(3)
    truth = np.zeros((300, 300), bool)
    truth[60:230, 80:250] = True
    for lam in (2.0, 5.0):
        img = rng.poisson(np.where(truth, lam, 0.2)).astype(float)
        auto = watershed_image(img)
        assert auto.max() == 1
        iou = (truth & (auto == 1)).sum() / (truth | (auto == 1)).sum()
        assert iou > 0.9
        assert watershed_image(img, WatershedParams(smooth=0)).max() > 50


def test_small_crystals_are_not_smoothed():
    """Crystals ~20 px across (inscribed radius ~10 px, where the automatic width has
    ramped down to none): identical labels with and without the automatic smoothing;
    an explicit width is applied."""
    rng = np.random.default_rng(4)
    truth = np.zeros((64, 64), bool)
    truth[10:30, 12:32] = True
    truth[35:55, 30:50] = True
    img = rng.poisson(np.where(truth, 3.0, 0.2)).astype(float)
    np.testing.assert_array_equal(watershed_image(img), watershed_image(img, WatershedParams(smooth=0)))
    assert not np.array_equal(watershed_image(img, WatershedParams(smooth=2.0)), watershed_image(img))
    with pytest.raises(ParameterError):
        WatershedParams(smooth=-1)


def test_label_maxima_equal_scipy():
    """Heights equal ``ndi.maximum``; each position holds its label's maximum, the first
    such pixel in raster order (scipy picks among ties in its sort's order)."""
    from spedflow.segment._watershed import _label_maxima
    rng = np.random.default_rng(4)
    values = rng.integers(0, 6, (40, 50)).astype(np.float64)  # many ties
    labels, n = ndi.label(rng.random((40, 50)) < 0.5)
    height, where = _label_maxima(values, labels, n)
    idx = np.arange(1, n + 1)
    np.testing.assert_array_equal(height, ndi.maximum(values, labels, idx))
    assert where.shape == (n, 2)
    np.testing.assert_array_equal(labels[where[:, 0], where[:, 1]], idx)
    np.testing.assert_array_equal(values[where[:, 0], where[:, 1]], height)
    for i in rng.choice(idx, 20, replace=False):  # the first maximal pixel in raster order
        first = np.flatnonzero((labels == i) & (values == height[i - 1]))[0]
        assert tuple(where[i - 1]) == np.unravel_index(first, values.shape)


def test_automatic_smoothing_width_has_no_step():
    """None up to an inscribed radius of 10 px, one pixel at 20 px, a twentieth of the
    radius beyond; continuous and non-decreasing in between (no radius at which two
    images of one crystal, measured a pixel apart, are treated very differently)."""
    from spedflow.segment._watershed import auto_smooth_width
    r = np.linspace(0, 60, 60001)
    w = np.array([auto_smooth_width(v) for v in r])
    assert (w[r <= 10] == 0).all()
    assert auto_smooth_width(20.0) == pytest.approx(1.0)
    np.testing.assert_allclose(w[r >= 20], r[r >= 20] / 20)
    assert (np.diff(w) >= 0).all()
    assert np.abs(np.diff(w)).max() <= 0.1 * (r[1] - r[0]) + 1e-12  # Lipschitz: no jumps


@pytest.mark.parametrize("seed", range(4))
def test_noisy_crystal_just_under_forty_pixels_is_one_segment(seed):
    """A 39 px crystal at ~2 counts per scan pixel over 0.2: its noisy mask measures an
    inscribed radius of 18-19 px, under the 20 px where the width reaches one pixel.
    Unsmoothed its holes and bridges cut it into pieces; the ramped width keeps it whole."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((120, 120), bool)
    truth[30:69, 40:79] = True
    img = rng.poisson(np.where(truth, 2.0, 0.2)).astype(float)
    auto = watershed_image(img)
    assert auto.max() == 1
    assert (truth & (auto == 1)).sum() / (truth | (auto == 1)).sum() > 0.85
    assert watershed_image(img, WatershedParams(smooth=0)).max() > 5


def _square_on_noise(rng, contrast, ramp=0.0, shape=(96, 96)):
    """A 40 px square of mean ``contrast`` (a linear thickness ramp of +-``ramp`` across
    it) on white Gaussian noise of standard deviation 1."""
    truth = np.zeros(shape, bool)
    truth[28:68, 20:60] = True
    x = np.linspace(-1.0, 1.0, shape[1])[None, :]
    signal = np.where(truth, contrast * (1.0 + ramp * x), 0.0)
    return truth, signal + rng.normal(size=shape)


@pytest.mark.parametrize("contrast", [1.5, 2.0, 3.0, 6.0])
def test_image_snr_is_the_contrast_over_the_noise(contrast):
    """On a crystal of contrast C over noise of 1, with a thickness ramp (structure,
    not noise: the second differences it is measured by do not see it), the pixel
    signal-to-noise ratio is C within 10 %; a crystal buried in noise measures under
    the ``snr_floor`` of 2, so it would be smoothed."""
    from spedflow.segment._watershed import image_snr
    for seed in range(3):
        rng = np.random.default_rng(seed)
        _, img = _square_on_noise(rng, contrast, ramp=0.3)
        assert image_snr(img) == pytest.approx(contrast, rel=0.1)
        # the ratio does not depend on the image's units or offset
        assert image_snr(7.0 * img + 100.0) == pytest.approx(image_snr(img), rel=1e-6)
    _, buried = _square_on_noise(np.random.default_rng(0), 0.5)
    assert image_snr(buried) < 2.0
    assert image_snr(np.zeros((20, 20))) == np.inf


@pytest.mark.parametrize("profile", [[100, 100], [40, 100, 40], [30, 90, 100, 90, 30]])
def test_a_thin_bright_crystal_is_not_taken_for_noise(profile):
    """Rods 2-5 px wide at ~100 counts: their profile across the rod curves sharply,
    which second differences across it would count as noise; measured along the rod
    they stand well over an ``snr_floor`` of 2 and are not smoothed (the labels equal
    those without the rule)."""
    from spedflow.segment._watershed import image_snr
    rng = np.random.default_rng(2)
    rod = np.zeros((48, 48))
    rod[10:38, 20:20 + len(profile)] = profile
    img = rng.poisson(rod + 0.3).astype(float)
    assert image_snr(img) > 3.0
    np.testing.assert_array_equal(watershed_image(img, WatershedParams(snr_floor=2)),
                                  watershed_image(img))


@pytest.mark.parametrize("factor", [0.1, 0.3, 0.6, 0.95])
def test_gaussian_width_for_noise_equals_scipy_on_white_noise(factor):
    """The width's Gaussian (scipy's filter, on white noise) divides the noise's standard
    deviation by ``1 / factor``."""
    from spedflow.segment._watershed import gaussian_width_for_noise
    sigma = gaussian_width_for_noise(factor)
    noise = np.random.default_rng(1).normal(size=(1024, 1024))
    assert ndi.gaussian_filter(noise, sigma).std() / noise.std() == pytest.approx(factor, rel=0.03)


def test_noise_smooth_width_lifts_noisy_images_to_the_target_and_ramps_to_none():
    """Under 0.75 of the floor the width lifts the ratio to ``SNR_TARGET`` (5); none from
    the floor up; continuous and non-increasing in the ratio in between."""
    from spedflow.segment._watershed import (_MAX_NOISE_SMOOTH, SNR_TARGET,
                                             gaussian_width_for_noise, noise_smooth_width)
    for snr in (0.5, 1.0, 1.5):
        assert noise_smooth_width(snr, 2.0) == gaussian_width_for_noise(snr / SNR_TARGET)
    assert noise_smooth_width(2.0, 2.0) == 0.0
    assert noise_smooth_width(5.0, 2.0) == 0.0
    assert noise_smooth_width(np.inf, 2.0) == 0.0
    assert noise_smooth_width(1.0, 0.0) == 0.0  # the rule switched off
    r = np.linspace(0.05, 2.5, 2000)
    w = np.array([noise_smooth_width(v, 2.0) for v in r])
    assert (np.diff(w) <= 0).all()
    assert np.abs(np.diff(w)[r[1:] > 1.0]).max() < 0.01  # no step where the ramp starts or ends
    assert noise_smooth_width(1e-3, 2.0) == _MAX_NOISE_SMOOTH
    with pytest.raises(ParameterError, match="snr_floor"):
        WatershedParams(snr_floor=-1)


@pytest.mark.parametrize("seed", range(4))
def test_a_crystal_in_low_dose_noise_is_one_segment(seed):
    """A 24 px crystal at ~3 counts per scan position over 0.5 (a pixel signal-to-noise
    ratio ~1.3, as in VDF images at a few hundred counts per pattern): too small for the
    size-based width, so without the noise rule (the default) its holes and bridges
    cut it into pieces; with ``snr_floor=2`` the crystal is one segment."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((64, 64), bool)
    truth[20:44, 18:42] = True
    img = rng.poisson(np.where(truth, 3.0, 0.5)).astype(float)

    def best_iou(labels):
        return max((truth & (labels == k)).sum() / (truth | (labels == k)).sum()
                   for k in range(1, labels.max() + 1))

    assert best_iou(watershed_image(img, WatershedParams(snr_floor=2))) > 0.9
    assert best_iou(watershed_image(img)) < 0.6


def _ramp_crystal(cover_cols, seed=0, n=64):
    """A loading map: a crystal whose thickness falls 1.2 -> 0 across columns
    ``< cover_cols`` (a wedge), on a background of |N(0, 0.004)| (NMF's near-zero
    outside it)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    image = np.abs(rng.normal(0, 0.004, (n, n)))
    crystal = (xx < cover_cols) & (yy > 2) & (yy < n - 3)
    image[crystal] += 1.2 * (1 - xx[crystal] / cover_cols)
    return image, crystal


def test_background_noise_where_a_crystal_covers_much_of_the_map():
    """A wedge over 57 % of the map, 48 % above Li's threshold: its ramp is most of the
    whole map's median absolute deviation (~65x the background's), in whose unit its
    peak is ~5, under ``min_snr``. Over 40 % of the map under the mask, the background
    is measured alone (1.4826 x its MAD, by brute force) and the crystal is kept; over
    50 %, for the median test too. Under 40 %, and where the background is exact
    zeros, the whole map's value is kept."""
    from spedflow.segment._watershed import _smoothed_mask, background_noise
    p = WatershedParams(min_snr=10)
    image, crystal = _ramp_crystal(40)
    _, mask = _smoothed_mask(image, p)
    assert crystal.mean() > 0.5 and 0.4 <= mask.mean() < 0.5
    whole = 1.4826 * np.median(np.abs(image - np.median(image)))
    rest = image[~mask]
    brute = 1.4826 * np.median(np.abs(rest - np.median(rest)))
    assert background_noise(image, mask) == pytest.approx(brute, rel=1e-6)
    assert brute < 0.004 and whole > 30 * brute
    assert image.max() < p.min_snr * whole  # the whole map's unit drops the crystal
    lab = watershed_image(image, p)
    assert lab.max() == 1 and ((lab > 0) & crystal).sum() / ((lab > 0) | crystal).sum() > 0.75
    # a wedge over 74 % of the map, 57 % above Li's threshold: past the median absolute
    # deviation's breakdown point the median test measures in the background's noise too
    # (in the whole map's deviation, the crystal's own contrast, it stood ~1 above the rest)
    wide, wedge = _ramp_crystal(52)
    _, mask = _smoothed_mask(wide, p)
    assert mask.mean() > 0.5
    spread = 1.4826 * np.median(np.abs(wide - np.median(wide)))
    rest = wide[~mask]
    assert background_noise(wide, mask, share=0.5) == pytest.approx(
        1.4826 * np.median(np.abs(rest - np.median(rest))), rel=1e-6)
    inside = wedge & mask
    assert np.median(wide[inside]) - np.median(wide[~inside]) < 3 * spread
    lab = watershed_image(wide, p)
    assert lab.max() == 1 and ((lab > 0) & wedge).sum() / ((lab > 0) | wedge).sum() > 0.7
    # a wedge over a sixth of the map: the whole map's deviation, as before
    small, _ = _ramp_crystal(10)
    _, mask = _smoothed_mask(small, p)
    assert mask.mean() < 0.4
    assert background_noise(small, mask) == 1.4826 * np.median(np.abs(small - np.median(small)))
    # a background of exact zeros reads 0: not a noise level, the whole map's is kept
    zeros = np.where(crystal, image, 0.0)
    _, mask = _smoothed_mask(zeros, p)
    assert mask.mean() >= 0.4
    assert background_noise(zeros, mask) == 1.4826 * np.median(np.abs(zeros - np.median(zeros))) > 0


@pytest.mark.parametrize("given, snr, want", [
    (None, 0.5, 2.0), (None, 0.99, 2.0),   # noise above signal: the noise rule on
    (None, 1.0, 0.0), (None, 5.6, 0.0),    # not: the paper's watershed
    (None, None, 0.0),                     # no images measured
    (0.0, 0.5, 0.0), (3.0, 5.6, 3.0),      # given: kept
])
def test_automatic_snr_floor_follows_the_images_noise(given, snr, want):
    from spedflow.segment._watershed import resolved_watershed
    p = resolved_watershed(WatershedParams(snr_floor=given), snr)
    assert p.snr_floor == want
    assert dataclasses.replace(p, snr_floor=given) == WatershedParams(snr_floor=given)


def test_unresolved_snr_floor_is_off_outside_the_vdf_workflow():
    """NMF's loading maps and ``watershed_image`` take the default (None) as 0."""
    rng = np.random.default_rng(2)
    img = rng.normal(0, 1.0, (48, 48))
    img[10:30, 12:34] += 1.2  # a noisy crystal: the rule would smooth it
    assert WatershedParams().snr_floor is None
    np.testing.assert_array_equal(watershed_image(img, WatershedParams()),
                                  watershed_image(img, WatershedParams(snr_floor=0.0)))
    assert not np.array_equal(watershed_image(img, WatershedParams()),
                              watershed_image(img, WatershedParams(snr_floor=2.0)))
