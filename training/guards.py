"""What keeps a long run alive and honest: preemption signals turned into a clean save-and-exit at the
next step boundary, and the non-finite guard that refuses to apply a NaN / Inf step.

    with Preemption(["SIGTERM", "SIGUSR1"]) as stop:
        for batch in data:
            ...
            if stop.requested:        # a signal arrived during the step: save, then exit 0
                break

Both decisions are made on the host once per step. With several processes every rank reaches the same
decision: the training loop all-reduces both flags with MAX before acting (`distributed.any_rank`).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient: the run stops."""


def signal_number(name: str) -> signal.Signals:
    """ "SIGTERM" or "TERM" -> the signal; ValueError naming an unknown one."""
    key = f"SIG{name.strip().upper().removeprefix('SIG')}"
    if key not in signal.Signals.__members__:
        raise ValueError(f"unknown signal {name!r} (e.g. SIGTERM, SIGUSR1)")
    return signal.Signals[key]


class Preemption:
    """Records the first of `signals` that arrives instead of dying of it; handlers are restored on exit.
    Outside the main thread (where Python cannot install handlers) it records nothing."""

    def __init__(self, signals: list[str]) -> None:
        self.signals = [signal_number(s) for s in signals]
        self.requested: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = self.requested or signal.Signals(signum).name

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
