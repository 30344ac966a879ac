"""Segmentation: watershed of VDF images / loading maps, correlation merging.

Kernels (NumPy) are in ``_watershed`` and ``_merge``; the dask wrapper is in
``lazy``.
"""

from ._merge import (MergeResult, correlation_matrix, drop_radial_pairs, drop_rims,
                     drop_shared_reflections, fold_fragments, merge_components,
                     merge_vdf_segments, split_overlapping, virtual_patterns)
from ._overlap import overlap_cut, split_overlaps
from ._spots import (AreaReflections, SpotOffsets, area_reflections, feed_peak_tables,
                     member_positions, read_peak_tables, spot_offsets)
from ._params import NMFMergeParams, VDFMergeParams, WatershedParams, pattern_sigma
from ._watershed import segments_from_labels, watershed_image
from .lazy import watershed_stack

__all__ = ["WatershedParams", "VDFMergeParams", "NMFMergeParams", "pattern_sigma",
           "watershed_image", "segments_from_labels", "watershed_stack",
           "MergeResult", "merge_vdf_segments", "drop_radial_pairs", "drop_rims",
           "drop_shared_reflections", "fold_fragments", "virtual_patterns", "merge_components",
           "correlation_matrix", "spot_offsets", "member_positions",
           "area_reflections", "SpotOffsets", "AreaReflections", "read_peak_tables",
           "feed_peak_tables", "overlap_cut", "split_overlaps", "split_overlapping"]
