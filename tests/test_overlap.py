"""spedflow.segment._overlap: two crystals of one orientation overlapping, cut in two."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from spedflow.errors import ParameterError
from spedflow.segment import (MergeResult, NMFMergeParams, VDFMergeParams, overlap_cut,
                              split_overlapping, split_overlaps)

SHAPE = (48, 48)


def _square(cy, cx, half, angle):
    """A filled square (a cube in projection) of side 2 * half, rotated by ``angle``."""
    yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]].astype(float)
    c, s = np.cos(angle), np.sin(angle)
    u, v = (yy - cy) * c + (xx - cx) * s, -(yy - cy) * s + (xx - cx) * c
    return (np.abs(u) <= half) & (np.abs(v) <= half)


def _ellipse(cy, cx, a, b, angle=0.0):
    yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]].astype(float)
    c, s = np.cos(angle), np.sin(angle)
    u, v = (yy - cy) * c + (xx - cx) * s, -(yy - cy) * s + (xx - cx) * c
    return (u / a) ** 2 + (v / b) ** 2 <= 1


def _image(masks, rng, levels=None, noise=0.05):
    """Intensities that add where crystals overlap, a little noise, 0 outside."""
    levels = [1.0] * len(masks) if levels is None else levels
    img = sum(lv * m.astype(float) for lv, m in zip(levels, masks))
    union = np.logical_or.reduce(masks)
    return np.where(union, img + noise * rng.standard_normal(SHAPE), 0.0).clip(0)


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("angle, offset", [(0.3, (7, 9)), (0.0, (8, 8)), (0.7, (10, -3))])
def test_two_overlapping_crystals_of_one_orientation_are_cut_into_each(angle, offset):
    """Two squares of one orientation overlapping by a third to a half: the union is cut
    along the chord of its two notches, and each part matches one crystal (IoU > 0.6)."""
    rng = np.random.default_rng(1)
    a = _square(20, 20, 8, angle)
    b = _square(20 + offset[0], 20 + offset[1], 8, angle)
    assert 0.2 < (a & b).sum() / a.sum() < 0.6
    parts = overlap_cut(_image([a, b], rng), 1.3)
    assert parts is not None
    p, q = parts
    assert not (p & q).any() and ((p | q) == (a | b)).all()
    best = sorted([_iou(p, a), _iou(q, b)]) if _iou(p, a) > _iou(q, a) else sorted([_iou(q, a), _iou(p, b)])
    assert min(best) > 0.6, best


@pytest.mark.parametrize("case", ["ellipse with a bright band", "kidney of even intensity",
                                  "union with a dim lens", "three crystals", "a disc"])
def test_single_crystals_and_other_shapes_are_not_cut(case):
    rng = np.random.default_rng(2)
    if case == "ellipse with a bright band":  # a thickness fringe across one crystal
        m = _ellipse(24, 24, 10, 16, 0.4)
        yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]]
        img = _image([m], rng) * (1 + 1.5 * (np.abs(xx - 24) < 3))
    elif case == "kidney of even intensity":  # two notches, no brighter lens
        m = (_ellipse(24, 24, 12, 16) & ~_ellipse(24, 43, 8, 8)) & ~_ellipse(24, 5, 8, 8)
        m = ndimage.binary_opening(m)
        img = _image([m], rng)
    elif case == "union with a dim lens":  # the overlap darker than its sides: no sum
        a, b = _square(20, 20, 8, 0.3), _square(27, 29, 8, 0.3)
        img = _image([a & ~b, b & ~a, a & b], rng, levels=[1.0, 1.0, 0.6])
    elif case == "three crystals":  # four notches
        masks = [_square(16, 16, 7, 0.0), _square(22, 24, 7, 0.0), _square(30, 16, 7, 0.0)]
        img = _image(masks, rng)
    else:
        img = _image([_ellipse(24, 24, 12, 12)], rng)
    assert overlap_cut(img, 1.3) is None
    assert overlap_cut(np.zeros(SHAPE), 1.3) is None


def test_contrast_0_never_cuts_and_the_threshold_is_the_lens_ratio():
    rng = np.random.default_rng(3)
    a, b = _square(20, 20, 8, 0.3), _square(27, 29, 8, 0.3)
    img = _image([a, b], rng, noise=0.0)  # the lens exactly 2x its sides
    assert overlap_cut(img, 0) is None
    assert overlap_cut(img, 1.9) is not None and overlap_cut(img, 2.1) is None


def test_split_overlaps_keeps_order_and_names_the_origin():
    rng = np.random.default_rng(4)
    pair = _image([_square(20, 20, 8, 0.3), _square(27, 29, 8, 0.3)], rng)
    single = _image([_ellipse(24, 24, 8, 12)], rng)
    maps = np.stack([single, pair, single]).astype(np.float32)
    new, origin = split_overlaps(maps, 1.3)
    assert origin.tolist() == [0, 1, 1, 2] and new.dtype == np.float32
    np.testing.assert_array_equal(new[0], maps[0])
    np.testing.assert_array_equal(new[1] + new[2], maps[1])
    empty, none = split_overlaps(maps[:0], 1.3)
    assert empty.shape == (0,) + SHAPE and none.size == 0


def test_split_overlapping_gives_both_parts_the_groups_vectors():
    rng = np.random.default_rng(5)
    pair = _image([_square(20, 20, 8, 0.3), _square(27, 29, 8, 0.3)], rng).astype(np.float32)
    single = _image([_ellipse(24, 24, 8, 12)], rng).astype(np.float32)
    result = MergeResult(np.stack([pair, single]), (np.array([0, 1, 2]), np.array([3, 4])),
                         (np.array([3.0, 2.0, 1.0]), np.array([1.0, 1.0])),
                         (np.array([0, 1]), np.array([2])), np.zeros((5, 2)), 2)
    out = split_overlapping(result, VDFMergeParams())
    assert len(out.summed) == 3
    assert sorted(m.tolist() for m in out.members) == [[0, 1, 2], [0, 1, 2], [3, 4]]
    totals = out.summed.reshape(3, -1).sum(axis=1)
    assert (np.diff(totals) <= 0).all()  # by decreasing total, as MergeResult says
    p, q = [i for i, m in enumerate(out.members) if m.tolist() == [0, 1, 2]]
    np.testing.assert_array_equal(out.summed[p] + out.summed[q], pair)
    assert [out.segment_members[i].tolist() for i in (p, q)] == [[0, 1], [0, 1]]
    # the intensities split by each part's share, in the group's proportions
    np.testing.assert_allclose(out.intensities[p] + out.intensities[q], [3.0, 2.0, 1.0])
    np.testing.assert_allclose(out.intensities[p] / out.intensities[p][0], [1, 2 / 3, 1 / 3])
    assert split_overlapping(result, VDFMergeParams(overlap_contrast=0)) is result


@pytest.mark.parametrize("cls", [VDFMergeParams, NMFMergeParams])
def test_overlap_contrast_is_0_or_at_least_1(cls):
    for bad in (-1, 0.5):
        with pytest.raises(ParameterError, match="overlap_contrast"):
            cls(overlap_contrast=bad)
    assert cls(overlap_contrast=0).overlap_contrast == 0


def test_holes_in_a_map_are_no_notches():
    """A zero or NaN reading inside a union leaves the cut as it is, and a hole beside
    one real notch of a single crystal makes no cut (holes are filled, notches are open
    to the hull's edge)."""
    rng = np.random.default_rng(6)
    a, b = _square(20, 20, 8, 0.3), _square(27, 29, 8, 0.3)
    img = _image([a, b], rng)
    want = overlap_cut(img, 1.3)
    assert want is not None
    for bad in (0.0, np.nan):
        holed = img.copy()
        holed[24, 24] = bad
        got = overlap_cut(holed, 1.3)
        assert got is not None
        assert ((got[0] | got[1]) == (want[0] | want[1]) & (holed > 0)).all()
    one = _ellipse(24, 24, 12, 16) & ~_ellipse(24, 43, 8, 8)  # one notch
    img = _image([one], rng)
    yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]]
    img = img * (1 + (np.abs(xx - 24) < 2))  # a bright band
    img[np.hypot(yy - 24, xx - 12) <= 3] = 0  # and a hole across from the notch
    assert overlap_cut(img, 1.3) is None


def test_a_noisy_map_is_not_cut(monkeypatch):
    """Under Rose's criterion (a pixel signal-to-noise ratio of 5) notches and a lens
    may be the noise's: no cut, though the shape and the lens would do."""
    from spedflow.segment import _overlap as O
    rng = np.random.default_rng(7)
    a, b = _square(20, 20, 9, 0.3), _square(28, 30, 9, 0.3)
    noisy = _image([a, b], rng, noise=0.35)
    assert overlap_cut(noisy, 1.5) is None
    monkeypatch.setattr(O, "MIN_SNR", 0.0)
    assert overlap_cut(noisy, 1.5) is not None
