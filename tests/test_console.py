"""The one progress display: a tqdm bar on a terminal (also one that reports no size), a plain line without one."""

import io

from fetalpipe.runtime.console import Progress


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_the_progress_is_a_bar_with_the_counters():
    terminal = FakeTerminal()
    progress = Progress(10, unit="img", description="infer", stream=terminal)
    progress.update(4, {"errors": 1, "need review": 0})
    progress.update(6, {"errors": 0, "need review": 2})
    progress.close()
    last = terminal.getvalue().split("\r")[-1]
    assert "infer: 100%|" in last and "10/10" in last and "1 errors, 2 need review" in last


def test_without_a_terminal_it_prints_lines_at_most_every_interval_and_at_the_end():
    stream = io.StringIO()
    progress = Progress(100, unit="img", description="infer", stream=stream, interval_s=3600)
    for _ in range(10):
        progress.update(10, {"errors": 0})
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("infer: 100/100 img (100 %)") and lines[0].endswith("0 errors")
    assert "\r" not in stream.getvalue()
