"""Warnings about bad input, rate-limited and truncated.

A peer that sends garbage at full rate must not turn the daemon's log into its own amplifier
(one 700 KB header used to become a 550 KB log line, and every malformed message 157 B of
WARNING). :class:`RateLimitedLog` lets a burst of lines through per kind of problem, then at most
one line per interval, each cut to a fixed length and carrying how many similar lines it held
back. The full counts live in counters that status shows; the log only has to say what happened.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["RateLimitedLog", "truncate"]

MAX_LINE_CHARS = 300


def truncate(text: str, limit: int = MAX_LINE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


class RateLimitedLog:
    """Per key: ``burst`` lines at once, then one line per ``interval_s``; the rest are counted."""

    def __init__(self, logger: logging.Logger, *, burst: int = 5, interval_s: float = 10.0,
                 max_chars: int = MAX_LINE_CHARS, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.burst, self.interval_s, self.max_chars, self.clock = logger, burst, interval_s, max_chars, clock
        self._tokens: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at WARNING unless ``key`` is over its rate; True if it was logged."""
        return self.log(logging.WARNING, key, msg, *args)

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        now = self.clock()
        tokens = self._tokens.get(key, float(self.burst))
        last = self._last.get(key, now)
        tokens = min(float(self.burst), tokens + (now - last) / self.interval_s)
        self._last[key] = now
        if tokens < 1.0:
            self._tokens[key] = tokens
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return False
        self._tokens[key] = tokens - 1.0
        held = self.suppressed.pop(key, 0)
        if self.logger.isEnabledFor(level):
            text = truncate(msg % args if args else msg, self.max_chars)
            if held:
                text += f" [{held} similar suppressed]"
            self.logger.log(level, "%s", text)
        return True
