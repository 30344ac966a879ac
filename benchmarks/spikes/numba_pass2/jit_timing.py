"""First-call cost of the fused kernel in a fresh process: compile (empty cache) or
load from numba's on-disk cache. Usage: venv/bin/python jit_timing.py CACHE_DIR"""
import os, sys, time
os.environ["NUMBA_CACHE_DIR"] = sys.argv[1]
os.environ["NUMBA_NUM_THREADS"] = "1"
t0 = time.perf_counter(); c0 = time.process_time()
import numba
t1 = time.perf_counter()
import numpy as np
from setup_data import load
d = load(); o = d["ops"]; NV = d["masks"].shape[1]
fr, sh = d["flat"][0][:2], d["shifts"][0][:2]
t2 = time.perf_counter(); c2 = time.process_time()
import nbgen as ng
out = np.empty((len(fr), NV), np.float32)
ng.pass2_chunk(fr, sh, o["order"], o["starts"], o["j0f"], o["j1f"], o["ff"], o["gf"], o["counts"], o["gain"],
               o["read_var"], o["klow"], o["A"], o["AT"], o["B"], o["BT"], o["idx32"], o["w"], True, out, False, o["j0s"], o["gs"], o["fs"])
t3 = time.perf_counter(); c3 = time.process_time()
ng.pass2_chunk(fr, sh, o["order"], o["starts"], o["j0f"], o["j1f"], o["ff"], o["gf"], o["counts"], o["gain"],
               o["read_var"], o["klow"], o["A"], o["AT"], o["B"], o["BT"], o["idx32"], o["w"], True, out, False, o["j0s"], o["gs"], o["fs"])
t4 = time.perf_counter()
print(f"import numba {t1 - t0:.2f} s; import nbgen + first call of pass2_chunk: wall {t3 - t2:.2f} s, "
      f"CPU {c3 - c2:.2f} s; second call {1e3 * (t4 - t3):.2f} ms")
