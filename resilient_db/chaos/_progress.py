"""The live progress line of a chaos run.

On a terminal: one line redrawn in place (``\\r``) a few times a second — a bar,
the elapsed time, the current phase(s), operations, success rate, unknown
outcomes and the breaker's state. Elsewhere (CI logs): no redrawing; one line
per phase change and one every few seconds, so a log stays readable.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from typing import Final, TextIO

__all__ = ["Progress", "ProgressState"]

_BAR: Final = 24
_LOG_EVERY: Final = 5.0


@dataclass(frozen=True, slots=True)
class ProgressState:
    """What the progress line shows at one instant."""

    elapsed: float
    duration: float
    phases: tuple[str, ...]
    ops: int
    ok: int
    unknown: int
    breaker: str


class Progress:
    """Writes the progress of a run to ``stream`` (stderr by default).

    Args:
        stream: where to write.
        live: redraw one line in place; default: whether ``stream`` is a terminal.
    """

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        if live is None:
            isatty = getattr(self.stream, "isatty", None)
            live = bool(isatty()) if callable(isatty) else False
        self.live = live
        self._drawn = False
        self._last_log = -_LOG_EVERY
        self._last_phases: tuple[str, ...] | None = None

    def _line(self, state: ProgressState) -> str:
        done = min(1.0, state.elapsed / state.duration) if state.duration > 0 else 1.0
        filled = int(done * _BAR)
        bar = "#" * filled + "-" * (_BAR - filled)
        rate = f"{100 * state.ok / state.ops:5.1f}%" if state.ops else "   - "
        phase = ",".join(state.phases) or "-"
        return (
            f"[{bar}] {state.elapsed:5.1f}/{state.duration:.0f}s  phase {phase}  "
            f"ops {state.ops}  ok {rate}  unknown {state.unknown}  breaker {state.breaker}"
        )

    def update(self, state: ProgressState) -> None:
        """Show ``state`` (redrawn live, or logged when the phase changes or now and then)."""
        line = self._line(state)
        if self.live:
            width = shutil.get_terminal_size((100, 20)).columns
            self.stream.write("\r" + line[: width - 1].ljust(width - 1))
            self.stream.flush()
            self._drawn = True
            return
        if state.phases != self._last_phases or state.elapsed - self._last_log >= _LOG_EVERY:
            self._last_phases = state.phases
            self._last_log = state.elapsed
            self.stream.write(line + "\n")
            self.stream.flush()

    def event(self, text: str) -> None:
        """A one-off message (a phase starting, a fault applied), on a line of its own."""
        self._clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def _clear(self) -> None:
        if self.live and self._drawn:
            width = shutil.get_terminal_size((100, 20)).columns
            self.stream.write("\r" + " " * (width - 1) + "\r")
            self._drawn = False

    def close(self) -> None:
        """Leave the terminal on a clean line."""
        self._clear()
        self.stream.flush()
