"""Shared fixtures: small simulated SPED stores with ground truth.

``sim_store``    48 x 48 scan of 64 x 64 patterns, 8 crystals (paper-like layout), ~1 s.
``sim_mgo_like`` 64 x 64 scan of 96 x 96 patterns, 9 cubes with the paper's MgO
                 features (overlapping same-orientation pair, weak off-axis
                 crystal over a strong one, holey film), ~2 s.

Both are session-scoped: tests must not modify them (copy first if needed).
"""

from __future__ import annotations

import pytest

from spedflow.simulate import simulate

@pytest.hookimpl(optionalhook=True)  # (a hook of pytest-xdist: unknown without it)
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject.toml): one test process per core this process may use
    (dask's count, which respects CPU affinity and cgroup quotas, unlike psutil's), at
    most 4; ``PYTEST_XDIST_AUTO_NUM_WORKERS`` overrides it."""
    import os

    from dask.system import CPU_COUNT
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", "").isdigit():
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    return max(1, min(4, int(CPU_COUNT)))


SIM_STORE = dict(scan=(48, 48), detector=64, crystals=8, seed=0)
SIM_MGO_LIKE = dict(scan=(64, 64), detector=96, crystals=9, seed=1)


@pytest.fixture(scope="session")
def sim_store(tmp_path_factory):
    """Path of a small simulated input store (see ``SIM_STORE``)."""
    path = tmp_path_factory.mktemp("sim") / "sim.zarr"
    return simulate(path, progress=False, **SIM_STORE)


@pytest.fixture(scope="session")
def sim_mgo_like(tmp_path_factory):
    """Path of a paper-like simulated store (see ``SIM_MGO_LIKE``)."""
    path = tmp_path_factory.mktemp("sim_mgo") / "mgo_like.zarr"
    return simulate(path, progress=False, **SIM_MGO_LIKE)
