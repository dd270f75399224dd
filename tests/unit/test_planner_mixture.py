"""Mixture schedules: values at and around points, and validation errors that quote the value."""

from __future__ import annotations

import numpy as np
import pytest

from fabricd.planner.mixture import MixtureSchedule

SOURCES = ["a", "b", "c"]


@pytest.mark.unit
def test_constant_normalises_and_fills_missing_sources_with_zero() -> None:
    s = MixtureSchedule("constant", [(0, {"a": 1.0, "b": 3.0})], SOURCES)
    np.testing.assert_allclose(s.weights(0), [0.25, 0.75, 0.0])
    np.testing.assert_allclose(s.weights(10**9), [0.25, 0.75, 0.0])
    w = s.weights(np.array([0, 5, 7]))
    assert w.shape == (3, 3) and w.dtype == np.float64
    np.testing.assert_allclose(w.sum(axis=1), 1.0)


@pytest.mark.unit
def test_piecewise_switches_exactly_at_points() -> None:
    s = MixtureSchedule("piecewise", [(0, {"a": 1}), (100, {"b": 1}), (200, {"a": 1, "c": 1})], SOURCES)
    np.testing.assert_allclose(s.weights(99), [1, 0, 0])
    np.testing.assert_allclose(s.weights(100), [0, 1, 0])
    np.testing.assert_allclose(s.weights(101), [0, 1, 0])
    np.testing.assert_allclose(s.weights(199), [0, 1, 0])
    np.testing.assert_allclose(s.weights(200), [0.5, 0, 0.5])
    np.testing.assert_allclose(s.weights(10**7), [0.5, 0, 0.5])
    rows = s.weights(np.array([99, 100, 200]))
    np.testing.assert_allclose(rows, [[1, 0, 0], [0, 1, 0], [0.5, 0, 0.5]])


@pytest.mark.unit
def test_linear_interpolates_between_points_and_holds_after_last() -> None:
    s = MixtureSchedule("linear", [(0, {"a": 1}), (100, {"b": 1}), (300, {"c": 2})], SOURCES)
    np.testing.assert_allclose(s.weights(0), [1, 0, 0])
    np.testing.assert_allclose(s.weights(1), [0.99, 0.01, 0])
    np.testing.assert_allclose(s.weights(50), [0.5, 0.5, 0])
    np.testing.assert_allclose(s.weights(99), [0.01, 0.99, 0])
    np.testing.assert_allclose(s.weights(100), [0, 1, 0])
    np.testing.assert_allclose(s.weights(101), [0, 0.995, 0.005])
    np.testing.assert_allclose(s.weights(299), [0, 0.005, 0.995])
    np.testing.assert_allclose(s.weights(300), [0, 0, 1])
    np.testing.assert_allclose(s.weights(10**8), [0, 0, 1])
    steps = np.arange(0, 400, 7)
    w = s.weights(steps)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    # vectorized and scalar evaluation agree bit for bit
    assert all(np.array_equal(w[i], s.weights(int(t))) for i, t in enumerate(steps))


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kind", "points", "quoted"),
    [
        ("cosine", [(0, {"a": 1})], "'cosine'"),
        ("piecewise", [], "[]"),
        ("piecewise", [(5, {"a": 1})], "5"),
        ("piecewise", [(0, {"a": 1}), (10, {"a": 1}), (10, {"b": 1})], "10"),
        ("linear", [(0, {"a": 1}), (20, {"a": 1}), (7, {"b": 1})], "7"),
        ("constant", [(0, {"a": -0.5})], "-0.5"),
        ("constant", [(0, {"a": float("nan")})], "nan"),
        ("constant", [(0, {"a": float("inf")})], "inf"),
        ("constant", [(0, {"zzz": 1.0})], "'zzz'"),
        ("constant", [(0, {"a": 0.0, "b": 0})], "sum to 0"),
        ("constant", [(0, {"a": 1}), (3, {"b": 1})], "exactly one point"),
    ],
)
def test_validation_quotes_the_bad_value(kind: str, points: list, quoted: str) -> None:
    with pytest.raises(ValueError) as err:
        MixtureSchedule(kind, points, SOURCES)
    assert quoted in str(err.value)


@pytest.mark.unit
def test_negative_step_is_refused() -> None:
    s = MixtureSchedule("constant", [(0, {"a": 1})], SOURCES)
    with pytest.raises(ValueError, match="-3"):
        s.weights(-3)
