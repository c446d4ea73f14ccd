"""The drift measure between the statistics a placement used and the current ones."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edgemoe.stats.drift import activation_distance, layer_distances, statistics_drift

L, E = 3, 6
counts = arrays(np.float64, (L, E), elements=st.floats(0, 1e6, allow_subnormal=False))


def test_identical_proportions_are_no_drift_whatever_the_volume() -> None:
    a = np.arange(L * E, dtype=float).reshape(L, E) + 1
    assert activation_distance(a, a) == 0.0
    assert activation_distance(a, 0.01 * a) < 1e-12  # decay scales counts, not proportions


def test_disjoint_experts_in_every_layer_are_full_drift() -> None:
    a, b = np.zeros((L, E)), np.zeros((L, E))
    a[:, :2], b[:, 3:] = 5.0, 1.0
    assert activation_distance(a, b) == pytest.approx(1.0)


def test_half_the_selections_moved_is_half() -> None:
    a, b = np.zeros((1, 4)), np.zeros((1, 4))
    a[0] = [1, 1, 0, 0]
    b[0] = [1, 0, 1, 0]
    assert activation_distance(a, b) == 0.5


def test_layers_without_counts_are_left_out_and_one_sided_layers_count_fully() -> None:
    a, b = np.zeros((L, E)), np.zeros((L, E))
    a[0, 0], b[0, 0] = 1.0, 2.0  # layer 0: same
    a[1, 1] = 1.0  # layer 1: only a has counts
    # layer 2: neither
    assert np.isnan(layer_distances(a, b)[2])
    assert activation_distance(a, b) == 0.5


@given(counts, counts)
def test_distance_is_symmetric_and_bounded(a: np.ndarray, b: np.ndarray) -> None:
    d = activation_distance(a, b)
    assert 0.0 <= d <= 1.0
    assert d == activation_distance(b, a)


@given(counts, counts)
def test_drift_is_bounded_and_zero_against_itself(a: np.ndarray, b: np.ndarray) -> None:
    cur = {"x": a, "y": b}
    assert 0.0 <= statistics_drift(cur, {"x": b, "y": a}) <= 1.0
    assert statistics_drift(cur, cur) == 0.0


def test_drift_is_the_worst_node() -> None:
    same = np.ones((L, E))
    moved = np.zeros((L, E))
    moved[:, 0] = 1.0
    # all of b's selections on one expert instead of spread over six: 5/6 of them moved
    assert statistics_drift({"a": same, "b": moved}, {"a": same, "b": same}) == pytest.approx(5 / 6)
    assert statistics_drift({"a": same, "b": same}, {"a": same, "b": same}) == 0.0


def test_a_node_the_placement_did_not_see_counts_only_once_it_has_counts() -> None:
    used = {"a": np.ones((L, E))}
    assert statistics_drift({"a": np.ones((L, E)), "new": np.zeros((L, E))}, used) == 0.0
    assert statistics_drift({"a": np.ones((L, E)), "new": np.ones((L, E))}, used) == 1.0


def test_a_node_without_counts_now_is_no_drift() -> None:
    """A restarted node's recorder starts empty: that alone must not re-place the cluster."""
    assert statistics_drift({"a": np.zeros((L, E))}, {"a": np.ones((L, E))}) == 0.0


def test_first_counts_after_an_empty_placement_are_full_drift() -> None:
    """The genesis epoch is placed before any request: the first workload must move experts."""
    assert statistics_drift({"a": np.ones((L, E))}, {"a": np.zeros((L, E))}) == 1.0


def test_counts_of_another_shape_are_full_drift() -> None:
    assert activation_distance(np.ones((L, E)), np.ones((L, E + 1))) == 1.0
