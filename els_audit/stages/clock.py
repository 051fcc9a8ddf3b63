"""The audit's clock: times each stage and reports progress lines.

Progress goes to ``progress(line)``.  A progress object that also has a method
``step(stage, done, total, planned_s)`` receives every step of the long stages (calibration,
then the network, machine and IS samplers of the prediction) with the seconds the plan
predicted for the stage (``None`` where nothing was planned), instead of the throttled
``step i/n`` lines: the CLI draws progress bars from them at a terminal.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from ..console import raise_if_terminated

ProgressFn = Callable[[str], None]


class Clock:
    """Times the stages and reports progress lines (``[  12.3s] trace done``).

    ``planned``: the plan's predicted seconds per stage (``calibrate``, ``predict``), set by
    the plan stage and passed with each step to a progress object that draws bars.
    """

    def __init__(self, progress: Optional[ProgressFn]):
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.planned: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the audit started."""
        return time.perf_counter() - self.t0

    def say(self, msg: str) -> None:
        raise_if_terminated()                 # a signal whose exception a library's C code lost
        if self.progress is not None:
            self.progress(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}")

    def stage(self, name: str, fn, *a, slow: bool = False, **kw):
        """Run one stage and time it; announce it when ``slow``, report it when it took >= 1 s."""
        if slow:
            self.say(f"{name} ...")
        t = time.perf_counter()
        out = fn(*a, **kw)
        self.timings[name] = time.perf_counter() - t
        if slow or self.timings[name] >= 1.0:
            self.say(f"{name} done in {self.timings[name]:.1f}s")
        return out

    def steps(self, planned: Optional[str] = None, every: float = 2.0):
        """A ``progress(stage, done, total)`` for the library stages: each step to a progress
        object with ``step`` (with the plan's seconds for the stage named ``planned``), else a
        line at most every ``every`` s."""
        last = {"t": 0.0}
        step = getattr(self.progress, "step", None)
        if step is not None:
            seconds = self.planned.get(planned) if planned else None
            return lambda stage, done, total: step(stage, done, total, seconds)

        def f(stage: str, done: int, total: int) -> None:
            now = time.perf_counter()
            if done == total or now - last["t"] >= every:
                last["t"] = now
                self.say(f"  {stage} step {done}/{total}")

        return f
