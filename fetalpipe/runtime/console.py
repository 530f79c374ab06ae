"""What a command shows its user: a header (what it will do), one progress display, and a summary (where every output is).

Ray's own logging (its start-up lines, Ray Data's execution plan, the C++ core worker's messages, Python warnings raised
inside Ray) goes to a log file under the output folder instead, unless `--verbose`. On a terminal the progress display is
a tqdm bar; without one (cron, `ray job submit`) it is a plain line every few seconds."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time

# The log file Ray's output last went to (the CLI names it when a run fails), and whether it goes there now.
_ray_log_path: str | None = None
_redirected = False
PROGRESS_LINE_INTERVAL_S = 5.0


def ray_log_path() -> str | None:
    return _ray_log_path


def ray_logs_redirected() -> bool:
    """True while stderr goes to the log file: `cluster.connect` then keeps the workers' output in Ray's own files."""
    return _redirected


@contextlib.contextmanager
def ray_logs_to_file(log_path: str, verbose: bool = False):
    """Send everything written to this process's stderr (file descriptor 2: Python logging, warnings and the C++ core
    worker alike) to `log_path` for the duration; our own console output goes to stdout. `verbose`: leave stderr alone."""
    global _ray_log_path, _redirected
    if verbose or _redirected:  # nested (study run -> infer): the outer file stays
        yield None
        return
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_stderr_fd = os.dup(2)
    with open(log_path, "a", buffering=1) as log:
        os.dup2(log.fileno(), 2)
        _ray_log_path, _redirected = log_path, True
        try:
            yield log_path
        finally:
            sys.stderr.flush()
            os.dup2(saved_stderr_fd, 2)
            os.close(saved_stderr_fd)
            _redirected = False


def ray_log_location(output_folder: str, name: str) -> str:
    """Where a command's Ray log goes: OUTPUT_FOLDER/logs/ray.log, or, for an object-store output (an object cannot be
    appended to), NAME in a local folder under the temp directory."""
    if "://" in str(output_folder):
        return os.path.join(tempfile.gettempdir(), "fetalpipe-logs", name)
    return os.path.join(os.path.abspath(output_folder), "logs", "ray.log")


def header(command: str, fields: dict[str, object]) -> None:
    """`fetalpipe COMMAND` and one aligned line per field."""
    summary(f"fetalpipe {command}", fields)


def summary(title: str, fields: dict[str, object]) -> None:
    """TITLE and one aligned line per field."""
    width = max((len(name) for name in fields), default=0)
    print("\n".join([title] + [f"  {name:<{width}}  {value}" for name, value in fields.items()]), flush=True)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Items done of a total, rate, ETA and named counters (errors, needs review). Thread-safe; `close()` prints the end state."""

    def __init__(self, total: int, unit: str = "img", description: str = "", stream=None, interval_s: float = PROGRESS_LINE_INTERVAL_S):
        self.total, self.unit, self.description = int(total), unit, description
        self.stream = stream or sys.stdout
        self.interval_s = interval_s
        self.done = 0
        self.counters: dict[str, int] = {}
        self.started = self.last_line = time.monotonic()
        self.lock = threading.Lock()
        self.bar = None
        if self.stream.isatty():
            import shutil

            from tqdm import tqdm

            # A pseudo-terminal that reports no size (0 x 0) gets a fixed 100-column bar: with 0 rows tqdm draws nothing.
            size = shutil.get_terminal_size(fallback=(0, 0))
            size_known = size.columns >= 40 and size.lines >= 2
            self.bar = tqdm(total=self.total, unit=unit, desc=description, file=self.stream, dynamic_ncols=size_known,
                            ncols=None if size_known else 100, nrows=None if size_known else 20, smoothing=0.05)

    def update(self, count: int, counters: dict[str, int] | None = None) -> None:
        with self.lock:
            self.done += int(count)
            for name, value in (counters or {}).items():
                self.counters[name] = self.counters.get(name, 0) + int(value)
            if self.bar is not None:
                self.bar.set_postfix_str(self._counter_text(), refresh=False)
                self.bar.update(int(count))
            elif time.monotonic() - self.last_line >= self.interval_s:
                self._print_line()

    def close(self) -> None:
        with self.lock:
            if self.bar is not None:
                self.bar.close()
            else:
                self._print_line()

    def _counter_text(self) -> str:
        return ", ".join(f"{value} {name}" for name, value in self.counters.items())

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        percent = 100.0 * self.done / self.total if self.total else 100.0
        eta = format_seconds((self.total - self.done) / rate) if rate > 0 else "?"
        text = f"{self.description + ': ' if self.description else ''}{self.done}/{self.total} {self.unit} ({percent:.0f} %), {rate:.1f} {self.unit}/s, elapsed {format_seconds(elapsed)}, ETA {eta}"
        counters = self._counter_text()
        return f"{text}, {counters}" if counters else text

    def _print_line(self) -> None:
        self.last_line = time.monotonic()
        print(self.line(), file=self.stream, flush=True)
