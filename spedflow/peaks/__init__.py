"""Peak finding (multi-scale LoG), peak tables and unique diffraction vectors.

Kernels (NumPy, one chunk) are in ``kernels``; the dask wrapper is in ``lazy``;
the unique-vector reduction (histogram process / merge / finalize) is in
``vectors``.
"""

from ._params import FALSE_PEAKS_PER_PATTERN, PeakParams, default_threshold, resolve
from .kernels import FILL_EDGE_SCALES, drop_fill_edge, find_peaks_log, log_sigmas, noise_level
from .lazy import (TABLE_COLUMNS, find_peaks, find_peaks_counting, measure_counts, peaks_block,
                   recentre_table)
from ._measure import (drop_ring_vectors, position_scatter, ring_contrast, spot_radius,
                       vector_scatter)
from .vectors import VectorParams, merge, peak_histogram, unique_vectors

__all__ = ["PeakParams", "resolve", "default_threshold", "FALSE_PEAKS_PER_PATTERN",
           "find_peaks_log", "log_sigmas", "noise_level", "find_peaks", "peaks_block", "recentre_table",
           "find_peaks_counting", "measure_counts", "drop_fill_edge", "FILL_EDGE_SCALES",
           "TABLE_COLUMNS", "VectorParams", "peak_histogram", "merge", "unique_vectors",
           "spot_radius", "ring_contrast", "drop_ring_vectors", "position_scatter",
           "vector_scatter"]
