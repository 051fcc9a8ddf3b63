"""Progress at a terminal: the audit's lines, and a bar per long stage.

When stderr is a terminal the CLI passes a :class:`TerminalProgress` as the audit's
progress: it prints the timestamped lines as before, and draws one tqdm bar for each long
stage (calibration, then the network, machine and IS samplers of the prediction), with
tqdm's own rate and ETA once steps complete and, before that, the seconds the cost plan
predicted for the stage.  Elsewhere (CI logs, pipes) the audit prints lines only.

tqdm (a small, dependency-free, widely used progress-bar library) draws the bars: redraws
in place, terminal width and rate smoothing are what it does well.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, TextIO

from tqdm import tqdm

__all__ = ["TerminalProgress"]


class TerminalProgress:
    """``progress(line)`` plus ``step(stage, done, total, planned_s)`` (see
    :mod:`els_audit.stages.clock`), drawn on the stream ``stream()`` returns when called
    (the CLI's real stderr, which it swaps while the audit runs)."""

    def __init__(self, stream: Callable[[], TextIO], prefix: str = "els-audit "):
        self.stream = stream
        self.prefix = prefix
        self._bar: Optional[tqdm] = None
        self._stage: Optional[str] = None

    def __call__(self, line: str) -> None:
        tqdm.write(f"{self.prefix}{line}", file=self.stream())

    def step(self, stage: str, done: int, total: int, planned_s: Optional[float]) -> None:
        if stage != self._stage or self._bar is None:
            self.close()
            plan = f"plan ~{planned_s:.0f}s" if planned_s else ""
            self._bar = tqdm(total=total, desc=f"{self.prefix}{stage}", file=self.stream(), unit="step", leave=True,
                             ncols=_columns(self.stream()), postfix=plan or None,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                        "[{elapsed}<{remaining}{postfix}]")
            self._stage = stage
        self._bar.update(done - self._bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._stage = None, None


def _columns(stream: TextIO, fallback: int = 100) -> int:
    """The terminal's width (a pseudo-terminal nobody sized reports 0: then ``fallback``)."""
    try:
        cols = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        cols = 0
    return cols if cols > 0 else fallback
