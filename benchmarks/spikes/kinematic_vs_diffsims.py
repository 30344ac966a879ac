"""Cross-check benchmarks/kinematic_sim.py against diffsims 0.7 (not a dependency)::

    python -m venv /tmp/dsvenv && /tmp/dsvenv/bin/pip install diffsims orix diffpy.structure
    /tmp/dsvenv/bin/python benchmarks/spikes/kinematic_vs_diffsims.py
"""
import sys
import numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import kinematic_sim as k
from diffpy.structure import Atom, Lattice, Structure
from orix.crystal_map import Phase
from orix.quaternion import Rotation
from diffsims.generators.simulation_generator import SimulationGenerator
from diffsims.utils.sim_utils import get_kinematical_intensities

T = 200.0      # A
PREC = 1.0
atoms = [Atom(el, x) for el, x in k.PHASES["MgO"]["atoms"]]
st = Structure(atoms=atoms, lattice=Lattice(4.212, 4.212, 4.212, 90, 90, 90))
phase = Phase("MgO", space_group=225, structure=st)
print("diffsims atoms:", len(phase.structure))

def sinc2(s, w):
    return np.sinc(s / w) ** 2

gen = SimulationGenerator(200, precession_angle=PREC, shape_factor_model=sinc2, approximate_precession=False)
hkl_all, g_all, F2_all = k.reflection_table("MgO", 1.0, B=0.0)

# |F|^2 directly
ds_F2 = get_kinematical_intensities(st, hkl_all, np.linalg.norm(g_all, axis=1), scattering_params="lobato")
print("|F|^2 mine/diffsims over %d reflections: min %.6f max %.6f" % (len(hkl_all), (F2_all / ds_F2).min(), (F2_all / ds_F2).max()))
for h in ([1, 1, 1], [2, 0, 0], [2, 2, 0], [3, 1, 1], [2, 2, 2], [4, 0, 0]):
    i = np.nonzero((hkl_all == h).all(1))[0][0]
    print("  F2", h, "mine %.3f diffsims %.3f  |g| %.4f" % (F2_all[i], ds_F2[i], np.linalg.norm(g_all[i])))
print("mixed-parity reflections in my table:", int((np.ptp(hkl_all % 2, axis=1) != 0).sum()))

rng = np.random.default_rng(7)
cases = {"[001]": k.zone_rotation(rng, "MgO", "001", 0.0)[0], "[011]": k.zone_rotation(rng, "MgO", "011", 0.0)[0],
         "random": k.random_rotation(rng), "random2": k.random_rotation(rng)}
for name, R in cases.items():
    gl = g_all @ R.T
    mine = k.precession_intensity(gl, F2_all, [T], PREC, n_az=180)[:, 0]
    best = None
    for conv, M in (("R", R), ("R.T", R.T)):
        sim = gen.calculate_diffraction2d(phase, rotation=Rotation.from_matrix(M), reciprocal_radius=1.0,
                                          with_direct_beam=False, max_excitation_error=1 / T)
        c = sim.coordinates
        dh = np.round(c.hkl).astype(int)
        dxyz = np.asarray(c.data)
        dI = np.asarray(c.intensity)
        idx = [np.nonzero((hkl_all == h).all(1))[0] for h in dh]
        ok = np.array([len(i) == 1 for i in idx])
        ii = np.array([i[0] for i in np.array(idx, dtype=object)[ok]])
        if len(ii) == 0:
            continue
        err = np.abs(gl[ii, :2] - dxyz[ok, :2]).max()
        if best is None or err < best[1]:
            best = (conv, err, dh[ok], dxyz[ok], dI[ok], ii)
    conv, err, dh, dxyz, dI, ii = best
    # reflections above 5% of the strongest in each
    m5 = set(map(tuple, hkl_all[mine >= 0.05 * mine.max()]))
    d5 = set(map(tuple, dh[dI >= 0.05 * dI.max()]))
    strong = dI >= 0.05 * dI.max()
    r = mine[ii][strong] / dI[strong]
    r /= np.median(r)
    print(f"{name}: rotation convention diffsims(Rotation.from_matrix({conv})); "
          f"max |g_xy| difference {err:.2e} A^-1 ({err / 0.015:.1e} px at 0.015 A^-1/px); "
          f">5%: mine {len(m5)}, diffsims {len(d5)}, common {len(m5 & d5)}; "
          f"rel. intensity mine/diffsims (>5%, median-normalised) {r.min():.4f}-{r.max():.4f}, "
          f"Pearson r {np.corrcoef(mine[ii][strong], dI[strong])[0, 1]:.4f}")
    top = np.argsort(-mine)[:6]
    print("   my strongest:", [(tuple(hkl_all[j]), round(float(np.linalg.norm(gl[j, :2]) / 0.015), 1), round(float(mine[j] / mine.max()), 3)) for j in top])
