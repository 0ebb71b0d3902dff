"""Progress reporting that suits where stderr goes: a live bar on a terminal, plain lines in a log file.

Why: a tqdm bar redraws itself with carriage returns; written into a file (``decoct quickstart >
log 2>&1``) that is hundreds of kilobytes on one line. And a bar that only counts epochs shows
``0/30`` for minutes. So :func:`progress` returns one object with tqdm's small interface
(``update``, ``set_postfix``, ``close``, iteration) that

* on a terminal (or in a notebook) draws a tqdm bar;
* elsewhere prints one plain line per ~10 % of the loop (count, rate, elapsed, ETA, postfix) and a
  line at least every ``LINE_EVERY_S`` seconds, so a user tailing a log of a long run sees signs of
  life; loops shorter than ``QUIET_S`` seconds print nothing;
* in both cases, once the first few seconds of the loop have been timed, prints ONE line when the
  loop will take longer than ``ESTIMATE_MIN_S`` ("squeeze: ~1h45m to go for 30 epochs at 42 img/s")
  and passes it to ``log`` (e.g. ``Run.log``, so it lands in ``log.jsonl``).

``DECOCT_PROGRESS=bar|lines|off`` forces a mode (``--no-progress`` still turns output off).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

LINE_STEPS = 10
"""Plain-line mode prints a line each time the loop crosses another 1/LINE_STEPS of its total."""
LINE_EVERY_S = 120.0
"""... and at least every this many seconds, whatever the fraction: 10 % of a 3-hour teacher is 18 minutes."""
QUIET_S = 5.0
"""Plain-line mode stays silent for loops (and between lines) shorter than this: a log shows signs of
life of long loops, not ten lines for each of many short ones (the students of an evaluation)."""
ESTIMATE_AFTER_S = 10.0
"""The run-time estimate is made after this many seconds of the loop (or 5 % of it, if sooner) ..."""
ESTIMATE_MIN_S = 180.0
"""... and printed only when the loop has more than this many seconds to go."""
MAX_LINE = 200
"""No progress line is longer than this (postfixes are cut)."""

MODES = ("bar", "lines", "off")


def format_seconds(s: float) -> str:
    """``3725`` -> ``1h02m``, ``125`` -> ``2m05s``, ``7.2`` -> ``7s`` (what a reader of a log needs)."""
    if not math.isfinite(s):
        return "?"
    s = max(0.0, s)
    if s >= 3600:
        h, rem = divmod(int(round(s)), 3600)
        return f"{h}h{rem // 60:02d}m"
    if s >= 60:
        m, sec = divmod(int(round(s)), 60)
        return f"{m}m{sec:02d}s"
    return f"{s:.0f}s" if s >= 10 else f"{s:.1f}s"


def format_count(n: float) -> str:
    """Counts in a log line: ``1234`` as is, ``12345`` as ``12.3k``, ``1_500_000`` as ``1.5M``."""
    n = float(n)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e4, "k")):
        if abs(n) >= div:
            return f"{n / (1e3 if suffix == 'k' else div):.3g}{suffix}"
    return f"{n:.0f}" if n == int(n) or abs(n) >= 100 else f"{n:.3g}"


def format_rate(r: float) -> str:
    return f"{r:.3g}" if r < 1000 else format_count(r)


def resolve_mode(enabled: bool, file: IO[str]) -> str:
    """``bar`` on a terminal or in a notebook, ``lines`` for a file or pipe, ``off`` when disabled."""
    if not enabled:
        return "off"
    forced = os.environ.get("DECOCT_PROGRESS", "").strip().lower()
    if forced:
        if forced not in MODES:
            raise ValueError(f"DECOCT_PROGRESS must be one of {', '.join(MODES)}, got {forced!r}")
        return forced
    isatty = getattr(file, "isatty", None)
    try:
        if isatty is not None and isatty():
            return "bar"
    except (ValueError, OSError):  # a closed stream
        return "off"
    if "ipykernel" in sys.modules:  # Jupyter: tqdm.auto draws a widget, not carriage returns
        return "bar"
    return "lines"


class Progress:
    """A progress reporter with tqdm's interface; see the module docstring. Build it with :func:`progress`."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | float | None = None, desc: str = "",
                 enabled: bool = True, initial: int | float = 0, unit: str = "it", span: str | None = None,
                 log: Callable[..., None] | None = None, file: IO[str] | None = None,
                 clock: Callable[[], float] = time.perf_counter, **tqdm_kw: Any) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit, self.span = total, desc, unit, span
        self.initial = self.n = initial
        self.file = file if file is not None else sys.stderr
        self.mode = resolve_mode(enabled, self.file)
        self.log, self.clock = log, clock
        self.postfix: dict[str, str] = {}
        self.t0 = self.last_line_t = clock()
        self.first: tuple[float, float] | None = None  # (time, n) at the first update: skips start-up cost
        self.estimated = False
        self.closed = False
        self.lines_printed = 0
        self.last_step = self._step(self.n)
        self.bar: Any = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            tqdm_kw.setdefault("dynamic_ncols", True)
            tqdm_kw.setdefault("leave", False)
            if total is not None and total >= 10_000:  # 1.5M/15M img, not 1500000/15000000
                tqdm_kw.setdefault("unit_scale", True)
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.file, **tqdm_kw)

    # --- tqdm's interface -----------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress reporter wraps no iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kw: Any) -> None:
        """Extra fields shown after the count (loss, epoch, ...), as tqdm's."""
        post = dict(ordered_dict or {}, **kw)
        self.postfix = {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in post.items()}
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=refresh)

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc
        if self.bar is not None:
            self.bar.set_description(desc, refresh=refresh)

    def write(self, msg: str) -> None:
        """Print a line without breaking a bar that is being drawn."""
        if self.mode == "off":
            return
        if self.bar is not None:
            self.bar.write(msg, file=self.file)
        else:
            print(msg, file=self.file, flush=True)

    def update(self, n: int | float = 1) -> None:
        """Advance by ``n`` units; may print a line (plain mode) or the one-off estimate."""
        if self.closed:
            return
        self.n += n
        now = self.clock()
        if self.first is None:
            self.first = (now, self.n)
        if self.bar is not None:
            self.bar.update(n)
        if not self.estimated:
            self._maybe_estimate(now)
        if self.mode == "lines":
            step = self._step(self.n)
            quiet = now - self.last_line_t < QUIET_S
            if (step > self.last_step and not quiet) or now - self.last_line_t >= LINE_EVERY_S:
                self.last_step = step
                self._line(now)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "lines" and self.n > self.initial:
            now = self.clock()
            # a summary line for a loop long enough to be worth one, unless that line was just printed
            if now - self.t0 >= QUIET_S and self.n != self._printed_n:
                self._line(now, final=True)

    # --- internals --------------------------------------------------------------------------
    _printed_n: float = -1

    def _step(self, n: float) -> int:
        if not self.total:
            return 0
        return int(LINE_STEPS * (n / self.total))

    def _rate(self, now: float) -> float:
        if self.first is None:
            return 0.0
        t, n = self.first
        if now - t > 0 and self.n > n:
            return (self.n - n) / (now - t)
        return (self.n - self.initial) / max(now - self.t0, 1e-9)

    def _line(self, now: float, final: bool = False) -> None:
        rate = self._rate(now)
        parts = [f"{self.desc}:" if self.desc else ""]
        if self.total:
            parts.append(f"{100 * self.n / self.total:3.0f}% {format_count(self.n)}/{format_count(self.total)} "
                         f"{self.unit}")
        else:
            parts.append(f"{format_count(self.n)} {self.unit}")
        parts.append(f"| {format_rate(rate)} {self.unit}/s | {format_seconds(now - self.t0)}")
        if self.total and not final and rate > 0 and self.n < self.total:
            parts[-1] += f", ETA {format_seconds((self.total - self.n) / rate)}"
        if self.postfix:
            parts.append("| " + " ".join(f"{k}={v}" for k, v in self.postfix.items()))
        line = " ".join(p for p in parts if p)
        if len(line) > MAX_LINE:
            line = line[: MAX_LINE - 3] + "..."
        print(line, file=self.file, flush=True)
        self.last_line_t = now
        self.lines_printed += 1
        self._printed_n = self.n

    def _maybe_estimate(self, now: float) -> None:
        if not self.total or self.first is None:
            return
        t1, n1 = self.first
        done = self.n - n1
        left = self.total - self.n
        if left <= 0:
            self.estimated = True
            return
        span_total = self.total - self.initial
        if done <= 0 or not (now - t1 >= ESTIMATE_AFTER_S or done >= 0.05 * span_total):
            return
        if now - t1 <= 0:
            return
        self.estimated = True
        rate = done / (now - t1)
        remaining = left / rate
        if remaining < ESTIMATE_MIN_S:
            return
        what = self.span or f"{format_count(span_total)} {self.unit}"
        msg = (f"{self.desc or 'progress'}: ~{format_seconds(remaining)} to go for {what} at "
               f"{format_rate(rate)} {self.unit}/s (estimated from the first {format_seconds(now - t1)})")
        self.write(msg)
        if self.log is not None:
            self.log(event="estimate", what=self.desc, seconds_left=round(remaining, 1), rate=round(rate, 4),
                     unit=self.unit, span=what, done=self.n, total=self.total)


def progress(iterable: Iterable | None = None, *, total: int | float | None = None, desc: str = "",
             enabled: bool = True, **kw: Any) -> Progress:
    """A progress reporter for a loop (see the module docstring); off when ``enabled`` is False.

    Extra keywords: ``initial`` (count already done, on resume), ``unit`` (``"it"``, ``"img"``,
    ``"batch"``), ``span`` (what the whole loop is, for the estimate line: ``"30 epochs"``),
    ``log`` (called as ``log(event="estimate", ...)`` once), ``file`` (default stderr); anything
    else goes to tqdm in bar mode.
    """
    return Progress(iterable, total=total, desc=desc, enabled=enabled, **kw)


__all__ = ["ESTIMATE_MIN_S", "MODES", "Progress", "format_count", "format_seconds", "progress", "resolve_mode"]
