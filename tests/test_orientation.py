"""Joining NMF components of one crystal by their spot positions, against synthetic truth."""

import numpy as np
import pytest

from spedflow.segment import NMFMergeParams, merge_components
from spedflow.segment._orientation import factor_spots, join_groups, orientation_links, spot_match

K = 96            # detector
SCAN = (40, 60)
R = 2.0           # spot radius, px
MASK_R = 5.0      # beam mask radius


def lattice(a_len, theta, gamma=np.radians(75), ratio=1.2, kmax=40):
    a = a_len * np.array([np.sin(theta), np.cos(theta)])
    b = ratio * a_len * np.array([np.sin(theta + gamma), np.cos(theta + gamma)])
    g = np.array([h * a + k * b for h in range(-6, 7) for k in range(-6, 7) if (h, k) != (0, 0)])
    n = np.hypot(*g.T)
    return g[(n < kmax) & (n > 2 * MASK_R)], a


def pattern(g, inten):
    yy, xx = np.indices((K, K)) - K // 2
    p = np.zeros((K, K))
    for (gy, gx), i in zip(g, inten):
        p += i * np.exp(-((yy - gy) ** 2 + (xx - gx) ** 2) / (2 * (R / 1.5) ** 2))
    return p


def disc(cy, cx, rad):
    yy, xx = np.indices(SCAN)
    return np.hypot(yy - cy, xx - cx) <= rad


@pytest.fixture(scope="module")
def case():
    """Components with known crystals.

    A: one crystal in two thickness components (same spots, intensities drawn anew,
    complementary loadings: a ramp and its complement); B: another orientation touching
    A; C: A's orientation, far from A; D: A's orientation lying on top of A (a small
    crystal over it: loadings add); E: B's mirror twin (shares one row of B), touching B.
    """
    rng = np.random.default_rng(1)
    ga, _ = lattice(13.0, 0.3)
    gb, ub = lattice(15.0, 1.4)
    u = ub / np.linalg.norm(ub)
    ge = 2 * (gb @ u)[:, None] * u - gb  # mirror across B's first axis

    yy, xx = np.indices(SCAN)
    a_mask = disc(20, 18, 11)
    ramp = np.clip((xx - 14) / 8, 0, 1)
    ia = rng.uniform(0.05, 1, len(ga))
    comps = {  # A2's strong spots are A1's weak ones (a Pendelloesung fringe apart)
        "A1": (pattern(ga, ia), a_mask * ramp),
        "A2": (pattern(ga, 1.05 - ia), a_mask * (1 - ramp)),
        "B": (pattern(gb, rng.uniform(0.2, 1, len(gb))), disc(20, 38, 9) * 1.0),
        "C": (pattern(ga, rng.uniform(0.2, 1, len(ga))), disc(8, 54, 5) * 1.0),
        "D": (pattern(ga, rng.uniform(0.2, 1, len(ga))), disc(20, 25, 3) * 1.0),
        "E": (pattern(ge, rng.uniform(0.2, 1, len(ge))), disc(33, 50, 6) * 1.0),
    }
    names = list(comps)
    f = np.stack([comps[n][0] for n in names]) + 0.01 * rng.random((len(names), K, K))
    w = np.stack([comps[n][1] for n in names]).astype(float)
    w = w + 0.002 * rng.random(w.shape)
    w /= w.reshape(len(w), -1).max(axis=1)[:, None, None]
    cut = np.hypot(*(np.indices((K, K)) - K // 2)) <= MASK_R
    return names, f, w, cut


def links_of(f, w, cut, **kw):
    p = NMFMergeParams(**kw)
    return orientation_links(f, w, mask=cut, radius=R, min_g=2 * MASK_R, spot_threshold=p.spot_match,
                             support_level=p.support_level, nested_cover=p.on_top_cover,
                             nested_gain=p.on_top_gain)


def test_spots_are_the_lattice(case):
    names, f, w, cut = case
    pos, h, lit = factor_spots(f[0], cut, radius=R, min_g=2 * MASK_R)
    ga, _ = lattice(13.0, 0.3)
    inside = ga[(np.abs(ga) < K // 2 - 2).all(axis=1)] + K // 2
    d = np.hypot(*(pos[:, None] - inside[None]).transpose(2, 0, 1))
    assert (d.min(axis=1) <= 1.0).all()          # every spot found is a reflection
    assert len(pos) >= 0.8 * len(inside)         # and most reflections are found
    assert len(lit) >= len(pos)


def test_spot_match_same_and_other_orientation(case):
    names, f, w, cut = case
    s = [factor_spots(x, cut, radius=R, min_g=2 * MASK_R) for x in f]
    i = {n: k for k, n in enumerate(names)}
    same = spot_match(*s[i["A1"]][:2], s[i["A2"]][2], R)
    other = spot_match(*s[i["A1"]][:2], s[i["B"]][2], R)
    twin = min(spot_match(*s[i["B"]][:2], s[i["E"]][2], R), spot_match(*s[i["E"]][:2], s[i["B"]][2], R))
    assert same > 0.95 and other < 0.2 and twin < NMFMergeParams().spot_match


def test_correlation_merge_misses_thickness_components(case):
    names, f, w, cut = case
    _, _, groups = merge_components(f, w, pattern_mask=~cut)
    assert not any({0, 1} <= set(g.tolist()) for g in groups)   # the premise: A1, A2 apart


def test_joins_only_the_thickness_components(case):
    names, f, w, cut = case
    links, match = links_of(f, w, cut)
    i = {n: k for k, n in enumerate(names)}
    assert links[i["A1"], i["A2"]]
    assert not links[i["A1"], i["C"]] and not links[i["A2"], i["C"]]   # same orientation, apart
    assert not links[i["A1"], i["D"]] and not links[i["A2"], i["D"]]   # on top of A
    assert not links[i["B"], i["E"]]                                    # twin, other orientation
    assert links.sum() == 2
    groups = join_groups([np.array([k]) for k in range(len(names))], links, match,
                         NMFMergeParams().spot_guard)
    got = sorted(tuple(names[k] for k in g) for g in groups)
    assert got == sorted([("A1", "A2"), ("B",), ("C",), ("D",), ("E",)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_order_independent(case, seed):
    names, f, w, cut = case
    perm = np.random.default_rng(seed).permutation(len(names))
    links, match = links_of(f, w, cut)
    links_p, match_p = links_of(f[perm], w[perm], cut)
    np.testing.assert_array_equal(links_p, links[np.ix_(perm, perm)])
    np.testing.assert_allclose(match_p, match[np.ix_(perm, perm)])


def test_guard_stops_chain_through_mixed_component():
    # 0 and 2 are different crystals, 1 mixes them: 0-1 and 1-2 link, 0-2 do not match
    links = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], bool)
    match = np.array([[1, 0.8, 0.1], [0.8, 1, 0.7], [0.1, 0.7, 1]])
    groups = join_groups([np.array([0]), np.array([1]), np.array([2])], links, match, 0.3)
    assert sorted(map(tuple, groups)) == [(0, 1), (2,)]


def test_params_validated():
    from spedflow.errors import ParameterError
    with pytest.raises(ParameterError):
        NMFMergeParams(spot_match=1.5)
    with pytest.raises(ParameterError):
        NMFMergeParams(on_top_gain=0.5)


def test_a_component_holding_a_second_lattice_is_not_joined():
    """A small crystal of A's phase at another orientation (30 degrees) beside A's thin
    edge: its component carries A's spots too (they shine where it is), so it matches
    A's component by spots and would be joined to it; its other spots lie on a lattice
    of their own (``lattice_significance``), so it is not. A's two thickness components
    still are."""
    rng = np.random.default_rng(4)
    ga, _ = lattice(13.0, 0.3)
    gf, _ = lattice(13.0, 0.3 + np.radians(30))
    ia = rng.uniform(0.05, 1, len(ga))
    f = np.stack([pattern(ga, ia), pattern(ga, 1.05 - ia),
                  pattern(ga, np.ones(len(ga))) + pattern(gf, 0.8 * np.ones(len(gf)))])
    f = f + 0.01 * rng.random(f.shape)
    without, match, with_test = _links_beside_a(f, disc(20, 30, 4), rng)
    assert without[0, 1] and without[0, 2]          # the premise: spots alone join it
    assert match[0, 2] >= NMFMergeParams().spot_match
    assert with_test[0, 1] and not with_test[0, 2]


def _links_beside_a(f, third, rng):
    """:func:`orientation_links` of A's two thickness components (``f[0]``, ``f[1]``;
    loadings a ramp and its complement over A's disc) and a third component (``f[2]``,
    loading ``third``): the links without the lattice tests, the spot matches, and the
    links with them (the default ``lattice_significance``)."""
    _, xx = np.indices(SCAN)
    a_mask = disc(20, 18, 11)
    ramp = np.clip((xx - 14) / 8, 0, 1)
    w = np.stack([a_mask * ramp, a_mask * (1 - ramp), third * 1.0]).astype(float)
    w = w + 0.002 * rng.random(w.shape)
    w /= w.reshape(len(w), -1).max(axis=1)[:, None, None]
    p = NMFMergeParams()
    kw = dict(mask=_beam_cut(), radius=R, min_g=2 * MASK_R, spot_threshold=p.spot_match,
              support_level=p.support_level, nested_cover=p.on_top_cover,
              nested_gain=p.on_top_gain)
    without, match = orientation_links(f, w, **kw)
    with_test, _ = orientation_links(f, w, lattice_significance=p.lattice_significance, **kw)
    return without, match, with_test


def _beam_cut():
    return np.hypot(*(np.indices((K, K)) - K // 2)) <= MASK_R


def test_a_crystal_of_few_reflections_beside_another_is_not_joined():
    """A crystal showing two reflections and their Friedel mates (too few for a
    lattice of its own) touching A's thin edge, each component carrying the other's
    spots weakly (cross-talk, 4 % of its own, as NMF leaves where crystals meet): the
    spots match both ways, but the few lie off A's lattice, so it is not joined to A
    (a foreign simulator's set lost such a crystal into its neighbour). A's two
    thickness components still are."""
    rng = np.random.default_rng(5)
    ga, _ = lattice(13.0, 0.3)
    other, _ = lattice(17.0, 0.9, gamma=np.radians(100))
    gf = np.vstack([other[:2], -other[:2]])
    ia = rng.uniform(0.05, 1, len(ga))
    talk = 0.04
    f = np.stack([pattern(ga, ia) + pattern(gf, talk * np.ones(len(gf))),
                  pattern(ga, 1.05 - ia),
                  pattern(gf, np.ones(len(gf))) + pattern(ga, talk * np.ones(len(ga)))])
    f = f + 0.002 * rng.random(f.shape)
    without, match, with_test = _links_beside_a(f, disc(20, 33, 5), rng)
    assert without[0, 2] and match[0, 2] >= NMFMergeParams().spot_match  # the premise
    # (its own spots are only its four: A's weak copies are under the 5 % floor)
    assert len(factor_spots(f[2], _beam_cut(), radius=R, min_g=2 * MASK_R)[0]) == len(gf)
    assert with_test[0, 1] and not with_test[0, 2]


def test_drop_spanning_parts_drops_a_component_cut_into_parts_of_three_crystals():
    """A component whose pattern holds the spots of three crystals, cut into a part inside
    each: dropped. Parts inside two crystals, parts reaching out, and a component of
    crystals with spots of their own (precipitates of one orientation inside three
    grains): kept."""
    from spedflow.segment._orientation import drop_spanning_parts
    yy, xx = np.mgrid[:40, :60]
    ky = kx = 64
    mask = np.hypot(*(np.indices((ky, kx)) - 32)) < 4

    def disc(cy, cx, r):
        return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(float)

    def pattern(spots):
        p = np.zeros((ky, kx))
        for y, x in spots:
            p[y - 1:y + 2, x - 1:x + 2] += 1.0
        return p

    own = [[(10, 20), (54, 44)], [(20, 50), (44, 14)], [(50, 30), (14, 34)]]
    crystals = [disc(10, 10, 8), disc(10, 40, 8), disc(30, 25, 8)]
    parts = [disc(10, 8, 3), disc(10, 42, 3), disc(30, 25, 3)]
    maps = np.array(crystals + parts)
    source = np.array([0, 1, 2, 3, 3, 3])
    mixed = pattern([s for o in own for s in o])  # the band's pattern: all three crystals' spots
    patterns = np.array([pattern(o) for o in own] + [mixed] * 3)
    kw = dict(mask=mask, radius=2.0, min_g=6.0, containment=0.8, match=0.5)
    np.testing.assert_array_equal(drop_spanning_parts(maps, source, patterns, **kw),
                                  [1, 1, 1, 0, 0, 0])
    # inside two crystals only (a small crystal modelled with a band of another): kept
    assert drop_spanning_parts(maps[:5], source[:5], patterns[:5], **kw).all()
    # a part reaching out of its crystal is not inside it: two crystals left
    out = maps.copy()
    out[5] = (disc(30, 25, 3) + disc(30, 45, 6)) > 0
    assert drop_spanning_parts(out, source, patterns, **kw).all()
    # precipitates of one orientation: their own spots, kept
    precip = patterns.copy()
    precip[3:] = pattern([(8, 8), (56, 56), (8, 56)])
    assert drop_spanning_parts(maps, source, precip, **kw).all()
    assert drop_spanning_parts(maps, source, patterns, **{**kw, "containment": 1.5}).all()


def _crosstalk_case(real: bool):
    """Crystal A over the left of the scan, B over the right; component 1 (B's pattern)
    also takes a patch P inside A: a weak loading that is cross-talk (the data there
    are A's alone) or, with ``real``, a second crystal of B's orientation lying on A
    (the data there are A's plus B's)."""
    rng = np.random.default_rng(8)
    ga, _ = lattice(13.0, 0.3)
    gb, _ = lattice(15.0, 1.4)
    fa, fb = pattern(ga, rng.uniform(0.5, 1.0, len(ga))), pattern(gb, rng.uniform(0.5, 1.0, len(gb)))
    yy, xx = np.indices(SCAN)
    ra, rb = xx < 30, xx >= 32
    patch = (abs(yy - 20) < 4) & (abs(xx - 15) < 4)
    load = np.stack([ra * 1.0, rb * 1.0 + patch * (1.0 if real else 0.2)])
    true = np.stack([ra * 1.0, rb * 1.0 + patch * (1.0 if real else 0.0)])
    data = np.einsum("eyx,ekl->yxkl", true, np.stack([fa, fb])).reshape(-1, K, K)

    def region_pattern(region):
        return data[np.asarray(region).ravel()].mean(axis=0)

    maps = np.stack([ra, rb, patch]).astype(float)  # A's segment covers the patch
    mask = np.hypot(*(np.indices((K, K)) - K // 2)) <= MASK_R
    return maps, np.array([0, 1, 1]), region_pattern, np.stack([fa, fb]), load, [[0], [1]], mask


@pytest.mark.parametrize("real", [False, True])
def test_drop_duplicate_segments_drops_crosstalk_and_keeps_a_crystal_lying_on_another(real):
    """A component's weak patch on another crystal, where the data show none of its own
    reflections: dropped. A crystal of that orientation really lying there (the data
    show its reflections at the model's intensity): kept. Segments not covered by
    other components' are never tested."""
    from spedflow.segment._orientation import covered_by_others, drop_duplicate_segments
    maps, source, region_pattern, factors, loadings, groups, mask = _crosstalk_case(real)
    np.testing.assert_array_equal(covered_by_others(maps, source, 0.8), [False, False, True])
    keep, notes = drop_duplicate_segments(maps, source, region_pattern, factors, loadings, groups,
                                          mask=mask, radius=R, min_g=2 * MASK_R, containment=0.8,
                                          min_size=10)
    np.testing.assert_array_equal(keep, [True, True, real])
    (s, containers, n_own, shown, dropped), = notes
    assert s == 2 and containers == [0] and n_own >= 4 and dropped is not real
    assert (shown > 0.9) if real else (abs(shown) < 0.1)
    # nothing to test without containment
    keep, notes = drop_duplicate_segments(maps, source, region_pattern, factors, loadings, groups,
                                          mask=mask, radius=R, min_g=2 * MASK_R, containment=1.5,
                                          min_size=10)
    assert keep.all() and notes == []
