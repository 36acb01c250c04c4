"""One progress reporter for the long loops of the pipeline (shots simulated, measured, indexed, refined ...).

``Progress(total, what, log)`` is told how much is done (``update(n_done)`` or ``advance(n)``) and, when
a report is due, passes ``log`` one line::

    what: i/N items done, rate X/s, about T s left

A report is due every ``every_seconds`` seconds (0: at every update), or every ``every_n`` items when
that is given, and when the last item is done (unless ``report_end`` is False: the caller logs its
own summary then). The clock is a parameter, so the reporter is
tested with a fake one.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def progress_line(what: str, done: int, total: int, elapsed_s: float, items: str = "", detail: str = "") -> str:
    """``what: done/total items done[detail], rate X/s, about T s left`` (rate and time left from the elapsed time).

    Before anything is done (or at no elapsed time) the rate is 0 and the time left unknown."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    left = f"about {(total - done) / rate:.0f} s left" if rate > 0 else "time left unknown"
    counted = f"{done}/{total} {items}" if items else f"{done}/{total}"
    return f"{what}: {counted} done{detail}, rate {rate:.3g}/s, {left}"


class Progress:
    """Reports ``done`` out of ``total`` through ``log`` (a callable taking one line) when a report is due."""

    def __init__(self, total: int, what: str, log: Callable[[str], object], every_seconds: float = 30.0,
                 every_n: int | None = None, items: str = "", report_end: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.what, self.log, self.items, self.report_end = total, what, log, items, report_end
        self.every_seconds, self.every_n, self.clock = every_seconds, every_n, clock
        self.started = self.last_report = clock()
        self.done = self.last_done = 0

    def due(self, now: float) -> bool:
        """Whether a report is due at ``now`` (the interval passed, ``every_n`` more done, or all done)."""
        if self.done >= self.total:
            return self.report_end
        if self.every_n is not None:
            return self.done - self.last_done >= self.every_n
        return now - self.last_report >= self.every_seconds

    def update(self, done: int, detail: str = "") -> str | None:
        """Set the count done to ``done``; log and return the line if a report is due (else None).

        ``detail`` is appended after ``done`` in the line (e.g. ``" (3 integrated)"``)."""
        if done <= self.done:
            return None
        self.done = done
        now = self.clock()
        if not self.due(now):
            return None
        line = progress_line(self.what, self.done, self.total, now - self.started, self.items, detail)
        self.last_report, self.last_done = now, self.done
        self.log(line)
        return line

    def advance(self, count: int = 1, detail: str = "") -> str | None:
        """Add ``count`` to the count done (nothing for ``count <= 0``); as :meth:`update`."""
        if count <= 0:
            return None
        return self.update(self.done + count, detail)

    def finish(self, detail: str = "") -> str | None:
        """Count everything as done (the loop skipped some items); logs the last line unless it is logged."""
        return self.update(self.total, detail)
