"""Warnings about bad input are rate-limited per kind and truncated."""

from __future__ import annotations

import logging

import pytest

from fabricd.ratelog import RateLimitedLog, truncate

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_burst_then_one_line_per_interval_with_the_count_held_back(caplog):
    clock = Clock()
    rl = RateLimitedLog(logging.getLogger("t.rate"), burst=3, interval_s=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="t.rate"):
        logged = [rl.warning("malformed", "bad message %d", i) for i in range(1000)]
        assert sum(logged) == 3 and rl.suppressed["malformed"] == 997
        clock.t = 10.0
        assert rl.warning("malformed", "bad message again")
        assert not rl.warning("malformed", "and again")
        assert rl.warning("other", "another kind has its own budget")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5
    assert lines[3] == "bad message again [997 similar suppressed]"


def test_lines_are_truncated(caplog):
    rl = RateLimitedLog(logging.getLogger("t.trunc"), max_chars=50)
    with caplog.at_level(logging.WARNING, logger="t.trunc"):
        rl.warning("k", "header: %s", "x" * 700_000)
    (line,) = [r.getMessage() for r in caplog.records]
    assert len(line) < 100 and line.endswith("(700008 chars)")
    assert truncate("short") == "short"
