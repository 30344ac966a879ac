"""Preprocessing: navigation binning, direct-beam alignment, background removal.

``kernels`` holds the NumPy functions of one block, ``lazy`` the dask wrappers; the
lazy ones are re-exported here (names shared with the kernels refer to the lazy
versions; use ``spedflow.preprocess.kernels.<name>`` for the NumPy ones).
"""

from . import kernels
from ._params import PreprocessParams, resolve
from .kernels import DescanFit, centres_for_alignment, fit_descan
from .lazy import (align, beam_centres, bin_detector, bin_nav, estimate_beam_radius, preprocess,
                   repair_pixels, shift_patterns, subtract_background_dog)

__all__ = ["kernels", "PreprocessParams", "resolve", "DescanFit", "fit_descan",
           "centres_for_alignment", "align", "beam_centres", "bin_nav", "bin_detector",
           "estimate_beam_radius", "preprocess", "repair_pixels", "shift_patterns",
           "subtract_background_dog"]
