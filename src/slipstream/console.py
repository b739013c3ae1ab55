"""Service log lines that the launcher's console shows: the `slipstream.console` logger.

Every service logs to its own `logs/<service>.log` only; the launcher's console shows the progress
bar and the final verdict. A few events must reach the operator at once, though (a reward
endpoint down, the admission paused, a step that trained nothing): a service logs those to
`CONSOLE` (`console_log()`), and `ConsoleRelay`, polled by the launcher, echoes each such line of
any service log as `<service>: <message>` (the log file's name; WARNING and above also say
their level). Nothing else
of the logs reaches the console, so a healthy run's console stays quiet.

A line of the channel is what `setup_logging` writes for the logger `slipstream.console`:
`12:00:01 coordinator WARNING slipstream.console: reward unavailable ...`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

CONSOLE = "slipstream.console"
_LINE = re.compile(
    r"\b(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) " + re.escape(CONSOLE) + r": (?P<message>.*)$"
)


def console_log() -> logging.Logger:
    """The logger whose records the launcher's console shows (its own log too)."""
    return logging.getLogger(CONSOLE)


def console_line(log_line: str, service: str) -> str | None:
    """What the console shows for one line of `service`'s log; None for lines not on the channel."""
    m = _LINE.search(log_line.rstrip("\n"))
    if m is None:
        return None
    level = m["level"]
    said = "" if level in ("INFO", "DEBUG") else f"{level.lower()}: "
    return f"{service}: {said}{m['message']}"


class ConsoleRelay:
    """Follows every `*.log` in a logs directory from where it ends now (earlier runs' lines are
    never shown); `poll()` returns the console lines written since the last poll."""

    def __init__(self, logs: Path):
        self.logs = Path(logs)
        self.offsets: dict[Path, int] = {}
        for path in self._files():
            self.offsets[path] = path.stat().st_size

    def _files(self) -> list[Path]:
        return sorted(self.logs.glob("*.log")) if self.logs.is_dir() else []

    def poll(self) -> list[str]:
        out: list[str] = []
        for path in self._files():
            offset = self.offsets.get(path, 0)
            try:
                size = path.stat().st_size
                if size < offset:  # rotated or truncated: a new file
                    offset = 0
                if size == offset:
                    continue
                with path.open("rb") as f:
                    f.seek(offset)
                    data = f.read(size - offset)
            except OSError:
                continue
            complete = data[: data.rfind(b"\n") + 1]
            self.offsets[path] = offset + len(complete)
            for raw in complete.decode(errors="replace").splitlines():
                if (line := console_line(raw, path.stem)) is not None:
                    out.append(line)
        return out

    def echo(self, console) -> None:
        """Print the new console lines on `console` (a rich Console: above a live progress bar)."""
        for line in self.poll():
            console.print(line, markup=False, highlight=False, soft_wrap=True)
