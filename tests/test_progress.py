"""The one progress reporter (xfel_spread.progress), driven by a fake clock: no sleeping."""

from xfel_spread.progress import Progress, progress_line


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_line_gives_count_rate_and_time_left():
    assert progress_line("rank 0", 3, 12, 6.0, "lattices") == \
        "rank 0: 3/12 lattices done, rate 0.5/s, about 18 s left"
    assert progress_line("load", 2, 4, 1.0, detail=" (7 lattices)") == "load: 2/4 done (7 lattices), rate 2/s, about 1 s left"


def test_nothing_done_yet_has_no_time_left():
    assert progress_line("sim", 0, 5, 10.0) == "sim: 0/5 done, rate 0/s, time left unknown"
    assert progress_line("sim", 1, 5, 0.0) == "sim: 1/5 done, rate 0/s, time left unknown"


def test_reports_when_the_interval_passed_and_at_the_end():
    clock, lines = FakeClock(), []
    progress = Progress(4, "job", lines.append, every_seconds=10.0, items="shots", clock=clock)
    clock.now += 4.0
    assert progress.advance() is None  # 4 s after the start: not due
    clock.now += 6.0
    assert progress.advance() == "job: 2/4 shots done, rate 0.2/s, about 10 s left"
    clock.now += 1.0
    assert progress.advance() is None
    clock.now += 1.0
    assert progress.advance() == "job: 4/4 shots done, rate 0.333/s, about 0 s left"
    assert lines == ["job: 2/4 shots done, rate 0.2/s, about 10 s left", "job: 4/4 shots done, rate 0.333/s, about 0 s left"]
    assert progress.finish() is None and len(lines) == 2  # the end is logged once


def test_every_n_counts_items_not_seconds():
    clock, lines = FakeClock(), []
    progress = Progress(5, "batches", lines.append, every_n=2, clock=clock)
    for done in range(1, 6):
        clock.now += 1.0
        progress.update(done)
    assert [line.split(",")[0] for line in lines] == ["batches: 2/5 done", "batches: 4/5 done", "batches: 5/5 done"]


def test_every_update_with_a_zero_interval_and_finish_covers_skipped_items():
    clock, lines = FakeClock(), []
    progress = Progress(6, "rank 1", lines.append, every_seconds=0.0, clock=clock)
    clock.now += 2.0
    progress.advance(2)
    assert progress.advance(0) is None and progress.update(1) is None  # no progress, no line
    clock.now += 2.0
    assert progress.finish(" (4 skipped)") == "rank 1: 6/6 done (4 skipped), rate 1.5/s, about 0 s left"
    assert len(lines) == 2 and progress.done == 6


def test_without_report_end_the_last_item_only_logs_when_due():
    clock, lines = FakeClock(), []
    progress = Progress(3, "read", lines.append, every_seconds=10.0, report_end=False, clock=clock)
    clock.now += 1.0
    progress.advance(2)
    clock.now += 1.0
    assert progress.advance() is None and lines == []  # the caller logs its own summary
    assert progress.done == 3
