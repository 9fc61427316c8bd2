"""The terminal: per stage one live progress line and a summary; everything else goes to a log file.

    with quiet_console(cfg.output_dir, verbose=False) as log_path:   # the CLI and jobs.pipeline do this
        say("[ingest] 239 shards")                                  # a line on the terminal (and in the log)
        with progress("ingest", total=239, unit="shards") as bar:
            bar.update(1, tokens=1_234_567)

Quiet (the default of `transformllm` and `python -m jobs.pipeline`): the process's own stdout and stderr
(file descriptors 1 and 2) are pointed at `<output_dir>/logs/driver.log`, so whatever writes there lands in
the file: our loggers, Ray's start-up lines, Ray Data's execution plans, the worker output Ray streams to the
driver (vLLM engines, Ray Train workers, our actors) and tracebacks. Only `say` lines and the live progress
line reach the terminal, through a copy of the original descriptor. Ray Data's progress bars are turned off
(redrawn per block, they were most of the 1,647 lines `make demo` printed). An `output_dir` on object storage
gets its log written locally (a temp folder) and uploaded to `<output_dir>/logs/driver.log` at the end.
`--verbose` leaves the descriptors alone: everything on the terminal, as Ray prints it.

The live line is redrawn in place (carriage return) at most every 0.5 s and only on a terminal; where the
output is a file or a pipe (CI, `ray job submit` logs) the stage's start and summary lines are all it prints.
Outside a quiet session (tests, library use) `say` prints to stdout and progress lines are not drawn.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from typing import IO, Any, Callable, Iterator

log = logging.getLogger("transformllm")

_term: IO[str] | None = None
"""The terminal while a quiet session runs (a copy of the original stdout), else None."""
_term_err: IO[str] | None = None
"""The same for the original stderr: refusals and failures go there."""
_lock = threading.Lock()
_live = ""  # the progress line now drawn, if any


def _out() -> IO[str]:
    return _term if _term is not None else sys.stdout


def _is_tty() -> bool:
    try:
        return _term is not None and _term.isatty()
    except ValueError:
        return False


def _erase() -> None:
    """Erase the live line, if one is drawn (caller holds _lock)."""
    global _live
    if _live and _term is not None:
        _term.write("\r\033[K")
        _term.flush()
    _live = ""


def say(line: str, err: bool = False) -> None:
    """A line for the terminal (it also goes to the log); `err`: on standard error (refusals, failures)."""
    with _lock:
        _erase()
        out = (_term_err if _term_err is not None else sys.stderr) if err else _out()
        out.write(line + "\n")
        out.flush()
    if _term is not None:
        log.info(line)


def _draw(line: str) -> None:
    global _live
    with _lock:
        if _term is None:
            return
        _term.write("\r\033[K" + line)
        _term.flush()
        _live = line


def _clear() -> None:
    with _lock:
        _erase()


def _fmt_count(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.0f}"


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts of one stage's work; `line()` is what the terminal shows."""

    def __init__(self, stage: str, total: int | None, unit: str, interval: float = 0.5):
        self.stage, self.total, self.unit, self.interval = stage, total, unit, interval
        self.done = 0
        self.counters: dict[str, float] = {}
        self.t0 = time.time()
        self._first: tuple[float, int, float] | None = None  # (time, done, tokens) at the first progress seen
        self._last = 0.0
        self.enabled = _is_tty()

    def _mark(self) -> None:
        if self._first is None and self.done > 0:
            self._first = (time.time(), self.done, self.counters.get("tokens", 0))

    def update(self, n: int = 1, **counters: float) -> None:
        self.done += n
        for k, v in counters.items():
            self.counters[k] = self.counters.get(k, 0) + v
        self._mark()
        self._maybe_draw()

    def set(self, done: int, **counters: float) -> None:
        self.done = done
        self.counters.update(counters)
        self._mark()
        self._maybe_draw()

    def _maybe_draw(self) -> None:
        now = time.time()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            _draw(self.line(now))

    def line(self, now: float | None = None) -> str:
        now = now or time.time()
        # Rates from the first progress seen on (start-up, actors and engines coming up, excluded), once there is
        # more progress than that; until then from the stage's start.
        t_ref, done_ref, tok_ref = self.t0, 0, 0.0
        if self._first is not None and self.done > self._first[1] and now > self._first[0]:
            t_ref, done_ref, tok_ref = self._first
        elapsed = max(1e-9, now - t_ref)
        rate = (self.done - done_ref) / elapsed
        parts = [f"[{self.stage}] {self.done:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}",
                 f"{rate:,.2f} {self.unit}/s" if rate < 10 else f"{rate:,.0f} {self.unit}/s"]
        for k, v in self.counters.items():
            parts.append(f"loss {v:.3f}" if k == "loss" else f"cost {v:,.2f}" if k == "cost" else f"{k} {_fmt_count(v)}")
            if k == "tokens":
                parts.append(f"{_fmt_count((v - tok_ref) / elapsed)} tokens/s")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {_fmt_eta((self.total - self.done) / rate)}")
        return "  ".join(parts)


@contextlib.contextmanager
def progress(stage: str, total: int | None, unit: str) -> Iterator[Progress]:
    """A live progress line for the duration of the block (drawn only in a quiet session on a terminal)."""
    bar = Progress(stage, total, unit)
    try:
        yield bar
    finally:
        if bar.enabled:
            _clear()


@contextlib.contextmanager
def polling(stage: str, total: int | None, unit: str, poll: Callable[[], dict[str, Any] | None],
            every: float = 2.0) -> Iterator[None]:
    """A live line fed by `poll()` in a background thread, for work the driver only waits on (training):
    `poll` returns {"done": n, **counters} or None. Nothing runs unless the line is drawn."""
    with progress(stage, total, unit) as bar:
        if not bar.enabled:
            yield
            return
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every):
                try:
                    got = poll()
                except Exception:  # a file being replaced mid-read: try again at the next tick
                    got = None
                if got:
                    bar.set(int(got.pop("done")), **got)

        t = threading.Thread(target=loop, name=f"{stage}-progress", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join(timeout=5)


def log_dir(output_dir: str) -> str:
    return output_dir.rstrip("/") + "/logs"


@contextlib.contextmanager
def quiet_console(output_dir: str, verbose: bool = False) -> Iterator[str | None]:
    """Send the process's stdout/stderr to `<output_dir>/logs/driver.log` (see the module docstring); yields
    the log's path (None when verbose). Nested or verbose: does nothing."""
    global _term, _term_err
    if verbose or _term is not None:
        yield None
        return
    from transformllm_ray.storage import is_remote

    remote = is_remote(output_dir)
    folder = tempfile.mkdtemp(prefix="transformllm-logs-") if remote else log_dir(output_dir)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "driver.log")
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    term = os.fdopen(os.dup(1), "w", buffering=1)
    term_err = os.fdopen(os.dup(2), "w", buffering=1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    _term, _term_err = term, term_err
    shown = f"{log_dir(output_dir)}/driver.log"
    print(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} transformllm {' '.join(sys.argv[1:])}", flush=True)
    try:
        yield shown
    finally:
        _clear()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        _term = _term_err = None
        term.close()
        term_err.close()
        if remote:
            _upload(path, shown)


def _upload(local: str, uri: str) -> None:
    from transformllm_ray.storage import exists, read_bytes, write_bytes_atomic

    try:
        with open(local, "rb") as f:
            data = f.read()
        old = read_bytes(uri) if exists(uri) else b""  # earlier invocations' logs come first, as locally
        write_bytes_atomic(uri, old + data)
    except Exception as e:  # the run's outcome must not hinge on its log upload
        print(f"transformllm: could not upload the log to {uri} ({type(e).__name__}: {e}); it is at {local}",
              file=sys.stderr)


def disable_ray_data_bars() -> None:
    """Ray Data reads its progress-bar switch from its context, set when Ray Data is first imported."""
    if _term is None:
        return
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
