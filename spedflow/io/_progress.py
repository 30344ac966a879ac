"""A one-line progress bar on stderr: items done, throughput, time left."""

from __future__ import annotations

import sys
import time

__all__ = ["ProgressBar"]


class ProgressBar:
    """Redraws one line of ``stream`` (stderr) as work advances.

    Parameters
    ----------
    total : int
        Number of items (chunks) to do.
    item_bytes : float
        Uncompressed bytes per item, for the MB/s figure.
    label : str
        Shown before the bar.
    enabled : bool
        False makes every method a no-op.
    """

    def __init__(self, total: int, item_bytes: float = 0.0, *, label: str = "", enabled: bool = True,
                 stream=None, width: int = 30, min_interval: float = 0.2):
        self.total, self.item_bytes, self.label = max(int(total), 0), float(item_bytes), label
        self.enabled, self.stream, self.width = enabled, stream or sys.stderr, width
        self.min_interval = min_interval
        try:  # a log file or pipe gets the finished line only, not every redraw
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False
        self.done = 0
        self._decile = -1
        self._start_done = 0
        self._t0 = time.perf_counter()
        self._last = 0.0

    def start(self, done: int = 0) -> "ProgressBar":
        """Begin timing; ``done`` items were finished before (a resumed run)."""
        self.done = self._start_done = int(done)
        self._t0 = time.perf_counter()
        self._draw(force=True)
        return self

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        self._draw()

    def close(self) -> None:
        if self.enabled:
            self._draw(force=True, final=True)
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, force: bool = False, final: bool = False) -> None:
        if not self.enabled:
            return
        if not self.tty and not final:  # a log or a notebook: a line per tenth, no redraws
            decile = int(10 * self.done / self.total) if self.total else 10
            if decile <= max(self._decile, 0) or decile >= 10:
                return
            self._decile = decile
            self._write_line(force=True)
            self.stream.write("\n")
            self.stream.flush()
            return
        self._write_line(force)

    def _write_line(self, force: bool) -> None:
        now = time.perf_counter()
        if not force and now - self._last < self.min_interval and self.done < self.total:
            return
        self._last = now
        frac = self.done / self.total if self.total else 1.0
        fill = int(round(frac * self.width))
        elapsed = max(now - self._t0, 1e-9)
        rate = (self.done - self._start_done) / elapsed  # items / s this run
        mbs = rate * self.item_bytes / 1e6
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = _hms(left) if left == left else "--:--"
        line = (f"{chr(13) if self.tty else ''}{self.label}[{'#' * fill}{'-' * (self.width - fill)}] "
                f"{self.done}/{self.total} chunks  {mbs:7.1f} MB/s  ETA {eta} ")
        self.stream.write(line)
        self.stream.flush()


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
