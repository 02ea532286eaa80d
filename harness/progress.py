"""Progress of a measurement, from the process that measures to the one that waits.

A measuring process (`harness.worker`, a rank of `harness.distributed`) writes each step of the protocol as
one line on stderr, `tmath-progress: <what>`; the parent reads its child's stderr as it comes
(`StderrReader`), hands those lines to a callback (`tmath measure` prints them) and keeps every other line
as the tail a failed record carries.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import IO

PREFIX = "tmath-progress: "

Callback = Callable[[str], None]


def emitter(label: str = "") -> Callback:
    """What a measuring process calls with each step: one stderr line per call."""
    lead = f"{label}: " if label else ""

    def emit(message: str) -> None:
        print(f"{PREFIX}{lead}{message}", file=sys.stderr, flush=True)

    return emit


def to_stderr(message: str) -> None:
    """The parent's callback for `tmath measure`: each step on its own line."""
    print(f"tmath: {message}", file=sys.stderr, flush=True)


class StderrReader:
    """Reads a child's stderr on a thread: progress lines to `callback`, the rest kept (the last `chars`)."""

    def __init__(self, stream: IO[bytes], callback: Callback | None = None, chars: int = 4000):
        self._stream = stream
        self._callback = callback
        self._chars = chars
        self._lines: deque[str] = deque()
        self._size = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for raw in iter(self._stream.readline, b""):
            line = raw.decode(errors="replace")
            if line.startswith(PREFIX):
                if self._callback is not None:
                    self._callback(line[len(PREFIX) :].rstrip("\n"))
                continue
            self._lines.append(line)
            self._size += len(line)
            while self._size > self._chars and len(self._lines) > 1:
                self._size -= len(self._lines.popleft())

    @property
    def still_open(self) -> bool:
        """Whether the stream is still being read (something still holds it open)."""
        return self._thread.is_alive()

    def text(self, timeout: float | None = 5.0) -> str:
        """What was read, once the stream has closed (or after `timeout`: a grandchild may hold it open)."""
        self._thread.join(timeout)
        return "".join(self._lines)[-self._chars :]
