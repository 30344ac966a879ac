"""Figures and a self-contained HTML report of a segmentation result.

The only subpackage that imports matplotlib (Agg canvas, no pyplot). Imported lazily
so that ``spedflow.export`` can reuse the result reader without pulling in matplotlib.
"""

from __future__ import annotations

__all__ = ["write_report", "load_result", "segment_colours"]


def __getattr__(name):
    if name == "write_report":
        from ._html import write_report
        return write_report
    if name == "segment_colours":
        from ._figures import segment_colours
        return segment_colours
    if name == "load_result":
        from ._load import load_result
        return load_result
    raise AttributeError(f"module 'spedflow.report' has no attribute {name!r}")
