"""Type-ahead in chat: while an answer streams, what the user types is not echoed into the answer,
and a line finished with Enter is kept, to become the next message.

During the answer the terminal's echo is off (canonical mode and Ctrl-C stay on); afterwards the
complete lines waiting in the terminal are read and echo is restored. A line still being typed
(no Enter yet) stays in the terminal's buffer, where the next prompt's line editor picks it up and
shows it. Without a terminal (a pipe), nothing is needed: the lines wait in the pipe in order."""
from __future__ import annotations

import os
import sys


class TypeAhead:
    def __init__(self, stream=None):
        stream = stream if stream is not None else sys.stdin
        self.fd = None
        self.saved = None
        self.lines: list[str] = []  # complete lines typed during the answer, in order
        self.eof = False  # Ctrl-D typed during the answer
        try:
            fd = stream.fileno()
            if os.isatty(fd):
                self.fd = fd
        except (AttributeError, ValueError, OSError):
            pass

    def __enter__(self) -> "TypeAhead":
        if self.fd is None:
            return self
        try:
            import termios
            self.saved = termios.tcgetattr(self.fd)
            quiet = list(self.saved)
            quiet[3] &= ~(termios.ECHO | termios.ECHONL)  # lflag: no echo, still line by line
            termios.tcsetattr(self.fd, termios.TCSANOW, quiet)
        except (ImportError, OSError, ValueError):
            self.saved = None
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is None:
            return
        import termios
        try:
            self._drain()
        finally:
            termios.tcsetattr(self.fd, termios.TCSANOW, self.saved)
            self.saved = None

    def _drain(self) -> None:
        """Read the complete lines waiting (canonical mode: the fd is readable only for a finished line)."""
        import select
        data = b""
        while select.select([self.fd], [], [], 0)[0]:
            chunk = os.read(self.fd, 4096)
            if not chunk:  # Ctrl-D on an empty line
                self.eof = True
                break
            data += chunk
        parts = data.decode("utf-8", errors="replace").split("\n")
        if parts[-1] == "":  # after the last newline (a line ended by Ctrl-D has none: kept)
            parts.pop()
        self.lines += [ln.rstrip("\r") for ln in parts]
