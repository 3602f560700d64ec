"""Tests of mqttinfer.partition: activation network, normalized cut, Louvain, merging."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqttinfer.partition import (
    activation_network,
    contiguous_partitions,
    louvain_communities,
    merge_into_k,
    ncut_value,
    normalized_cut,
    partition_sizes_report,
    proportional_sizes,
    useless_community,
)


def planted_graph(sizes: list[int], inside: float = 1.0, across: float = 0.02, seed: int = 0):
    """Dense block graph: strong links inside each block, weak noisy links across."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    same = labels[:, None] == labels[None, :]
    weights = np.where(same, inside, across) * rng.uniform(0.5, 1.5, (labels.size, labels.size))
    weights = (weights + weights.T) / 2
    np.fill_diagonal(weights, 0.0)
    blocks = [np.flatnonzero(labels == block) for block in range(len(sizes))]
    return weights, blocks


def as_sets(parts):
    return sorted(tuple(int(x) for x in part) for part in parts)


def assert_partition(parts, n_filters, k):
    assert len(parts) == k
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(n_filters))
    for part in parts:
        assert part.dtype == np.int64
        assert part.size > 0
        assert np.all(np.diff(part) > 0)


# ----------------------------------------------------------------- activation network


def brute_force_network(acts: np.ndarray, rule: str) -> np.ndarray:
    n_filters = acts.shape[1]
    out = np.zeros((n_filters, n_filters))
    for row in acts.astype(np.float64):
        for i, j in itertools.product(range(n_filters), repeat=2):
            if i == j:
                continue
            diff = abs(row[i] - row[j])
            term = row[i] * row[j] * (diff if rule == "ah" else 1.0 / (diff + 1.0))
            out[i, j] += term
    return out


@pytest.mark.parametrize("rule", ["ah", "ca"])
def test_activation_network_matches_definition(rule):
    acts = np.random.default_rng(1).random((13, 7)).astype(np.float32)
    got = activation_network(acts, rule)  # type: ignore[arg-type]
    np.testing.assert_allclose(got, brute_force_network(acts, rule), rtol=1e-5, atol=1e-6)
    assert np.array_equal(got, got.T)
    assert np.all(np.diag(got) == 0.0)
    assert np.all(got >= 0.0)


def test_activation_network_chunks_give_same_sum(monkeypatch):
    acts = np.random.default_rng(2).random((50, 6))
    whole = activation_network(acts)
    import mqttinfer.partition as partition

    monkeypatch.setattr(partition, "_CHUNK_ELEMENTS", 1)  # one image per chunk
    np.testing.assert_allclose(activation_network(acts), whole, rtol=1e-6)


def test_activation_network_dead_filter_is_isolated():
    acts = np.random.default_rng(3).random((20, 5))
    acts[:, 2] = 0.0
    weights = activation_network(acts)
    assert np.all(weights[2] == 0.0) and np.all(weights[:, 2] == 0.0)


@pytest.mark.parametrize(
    ("acts", "message"),
    [
        (np.ones(5), "2-D"),
        (np.ones((0, 4)), "empty"),
        (np.array([[1.0, np.nan]]), "NaN"),
        (np.array([[1.0, -0.5]]), "non-negative"),
    ],
)
def test_activation_network_rejects_bad_input(acts, message):
    with pytest.raises(ValueError, match=message):
        activation_network(acts)


def test_activation_network_rejects_unknown_rule():
    with pytest.raises(ValueError, match="rule"):
        activation_network(np.ones((2, 2)), "xx")  # type: ignore[arg-type]


# ----------------------------------------------------------------- normalized cut


def test_two_block_graph_has_known_normalized_cut():
    # Two 4-cliques (weight 1) joined by one bridge of weight 0.1: the optimal 2-way cut
    # separates the cliques, Ncut = 0.1/vol(A) + 0.1/vol(B) with vol = 4·3 + 0.1.
    weights = np.zeros((8, 8))
    for block in (range(4), range(4, 8)):
        for i, j in itertools.permutations(block, 2):
            weights[i, j] = 1.0
    weights[3, 4] = weights[4, 3] = 0.1
    parts = normalized_cut(weights, 2)
    assert as_sets(parts) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert ncut_value(weights, parts) == pytest.approx(2 * 0.1 / 12.1)
    # ...and no other bipartition does better.
    best = min(
        ncut_value(weights, [np.array(a), np.setdiff1d(np.arange(8), a)])
        for size in range(1, 8)
        for a in itertools.combinations(range(8), size)
    )
    assert ncut_value(weights, parts) == pytest.approx(best)


@pytest.mark.parametrize("sizes", [[10, 10, 10], [6, 9, 12, 15], [20, 5]])
def test_normalized_cut_recovers_planted_blocks(sizes):
    weights, blocks = planted_graph(sizes)
    parts = normalized_cut(weights, len(sizes), seed=3)
    assert as_sets(parts) == as_sets(blocks)


def test_balanced_normalized_cut_gives_equal_sizes():
    weights, _ = planted_graph([7, 11, 12])
    parts = normalized_cut(weights, 3, balance=True)
    assert_partition(parts, 30, 3)
    assert [part.size for part in parts] == [10, 10, 10]


def test_balanced_normalized_cut_keeps_planted_equal_blocks():
    weights, blocks = planted_graph([8, 8, 8, 8])
    assert as_sets(normalized_cut(weights, 4, balance=True)) == as_sets(blocks)


def test_normalized_cut_is_deterministic_per_seed():
    weights = activation_network(np.random.default_rng(5).random((200, 40)))
    first = normalized_cut(weights, 5, seed=11)
    again = normalized_cut(weights, 5, seed=11)
    assert [p.tolist() for p in first] == [p.tolist() for p in again]
    assert_partition(first, 40, 5)


def test_normalized_cut_handles_isolated_filters():
    weights, _ = planted_graph([6, 6])
    padded = np.zeros((15, 15))
    padded[:12, :12] = weights  # filters 12, 13, 14 are dead
    parts = normalized_cut(padded, 3)
    assert_partition(parts, 15, 3)
    assert max(p.size for p in parts) - min(p.size for p in parts) <= 6


@pytest.mark.parametrize("n_filters", [1, 3, 5])
def test_normalized_cut_degenerate_graphs(n_filters):
    empty = np.zeros((n_filters, n_filters))
    for k in range(1, n_filters + 1):
        assert_partition(normalized_cut(empty, k), n_filters, k)
    full = np.ones((n_filters, n_filters)) - np.eye(n_filters)
    assert_partition(normalized_cut(full, n_filters), n_filters, n_filters)


def test_normalized_cut_k_larger_than_filters_is_a_clear_error():
    with pytest.raises(ValueError, match=r"cannot split 4 filters into k=5"):
        normalized_cut(np.ones((4, 4)), 5)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (np.ones((2, 3)), "square"),
        (np.array([[0.0, 1.0], [2.0, 0.0]]), "symmetric"),
        (np.array([[0.0, -1.0], [-1.0, 0.0]]), "non-negative"),
        (np.array([[0.0, np.inf], [np.inf, 0.0]]), "NaN or infinity"),
    ],
)
def test_normalized_cut_rejects_bad_weights(weights, message):
    with pytest.raises(ValueError, match=message):
        normalized_cut(weights, 1)


def test_normalized_cut_rejects_bad_k():
    with pytest.raises(ValueError, match="at least 1"):
        normalized_cut(np.ones((3, 3)), 0)


@settings(max_examples=25, deadline=None)
@given(
    n_filters=st.integers(min_value=2, max_value=24),
    data=st.data(),
)
def test_normalized_cut_always_returns_a_partition(n_filters, data):
    k = data.draw(st.integers(min_value=1, max_value=n_filters))
    seed = data.draw(st.integers(min_value=0, max_value=1000))
    density = data.draw(st.floats(min_value=0.0, max_value=1.0))
    rng = np.random.default_rng(seed)
    weights = rng.random((n_filters, n_filters)) * (rng.random((n_filters, n_filters)) < density)
    weights = np.triu(weights, 1)
    weights = weights + weights.T
    balance = data.draw(st.booleans())
    parts = normalized_cut(weights, k, seed=seed, balance=balance)
    assert_partition(parts, n_filters, k)
    if balance:
        assert max(p.size for p in parts) - min(p.size for p in parts) <= 1


# ----------------------------------------------------------------- Louvain and P0


def test_louvain_recovers_planted_communities_and_pools_dead_filters():
    weights, blocks = planted_graph([10, 10, 10], across=0.001)
    padded = np.zeros((34, 34))
    padded[:30, :30] = weights
    communities = louvain_communities(padded, seed=0)
    assert as_sets(communities) == as_sets([*blocks, np.arange(30, 34)])
    assert useless_community(padded, communities) == 3


def test_louvain_is_deterministic_per_seed():
    weights = activation_network(np.random.default_rng(6).random((100, 30)), "ca")
    first = louvain_communities(weights, resolution=1.2, seed=4)
    again = louvain_communities(weights, resolution=1.2, seed=4)
    assert [p.tolist() for p in first] == [p.tolist() for p in again]
    assert sorted(np.concatenate(first).tolist()) == list(range(30))


def test_louvain_rejects_bad_resolution():
    with pytest.raises(ValueError, match="resolution"):
        louvain_communities(np.ones((3, 3)) - np.eye(3), resolution=0.0)


def test_useless_community_weak_but_connected():
    weights, blocks = planted_graph([5, 5, 5], across=0.0)
    weights[10:, :] *= 1e-4
    weights[:, 10:] *= 1e-4
    assert useless_community(weights, blocks) == 2
    strong, strong_blocks = planted_graph([5, 5, 5])
    assert useless_community(strong, strong_blocks) is None


def test_useless_community_rejects_overlap():
    with pytest.raises(ValueError, match="overlap"):
        useless_community(np.ones((3, 3)) - np.eye(3), [np.array([0, 1]), np.array([1, 2])])


# ----------------------------------------------------------------- merging


def test_merge_into_k_reproduces_nonn_example():
    sizes = [12, 14, 25, 30]
    bounds = np.cumsum([0, *sizes])
    communities = [np.arange(bounds[i], bounds[i + 1]) for i in range(4)]
    merged = merge_into_k(communities, 2)
    assert sorted(p.size for p in merged) == [39, 42]
    assert_partition(merged, 81, 2)


def test_merge_into_k_splits_big_communities():
    weights, blocks = planted_graph([40, 4, 4])
    merged = merge_into_k(blocks, 4, weights)
    assert_partition(merged, 48, 4)
    assert max(p.size for p in merged) - min(p.size for p in merged) <= 4


def test_merge_into_k_more_parts_than_communities():
    merged = merge_into_k([np.arange(10)], 3)
    assert sorted(p.size for p in merged) == [3, 3, 4]


def test_merge_into_k_errors():
    with pytest.raises(ValueError, match="non-empty partitions"):
        merge_into_k([np.arange(3)], 4)
    with pytest.raises(ValueError, match="overlap"):
        merge_into_k([np.arange(3), np.arange(2, 5)], 2)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=8),
    data=st.data(),
)
def test_merge_into_k_sizes_are_near_equal(sizes, data):
    total = sum(sizes)
    k = data.draw(st.integers(min_value=1, max_value=min(total, 10)))
    bounds = np.cumsum([0, *sizes])
    communities = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
    merged = merge_into_k(communities, k)
    assert_partition(merged, total, k)
    target = -(-total // k)
    # LPT with pieces no larger than the target keeps every partition within one piece.
    assert max(p.size for p in merged) - min(p.size for p in merged) <= target


# ----------------------------------------------------------------- helpers


def test_partition_sizes_report_and_contiguous():
    parts = contiguous_partitions(10, [3, 3, 4])
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert "3 partitions of 10 filters" in partition_sizes_report(parts)
    with pytest.raises(ValueError, match="sum to"):
        contiguous_partitions(10, [3, 3])


# ----------------------------------------------------------------- sized cuts


def test_normalized_cut_with_given_sizes():
    weights, _ = planted_graph([10, 10, 10])
    parts = normalized_cut(weights, 3, sizes=[5, 10, 15])
    assert_partition(parts, 30, 3)
    assert sorted(p.size for p in parts) == [5, 10, 15]


def test_normalized_cut_sizes_with_isolated_filters():
    weights, _ = planted_graph([6, 6])
    padded = np.zeros((20, 20))
    padded[:12, :12] = weights
    parts = normalized_cut(padded, 4, sizes=[2, 3, 5, 10])
    assert_partition(parts, 20, 4)
    assert sorted(p.size for p in parts) == [2, 3, 5, 10]
    balanced = normalized_cut(padded, 3, balance=True)
    assert sorted(p.size for p in balanced) == [6, 7, 7]


def test_normalized_cut_rejects_bad_sizes():
    with pytest.raises(ValueError, match="summing to 4"):
        normalized_cut(np.ones((4, 4)) - np.eye(4), 2, sizes=[1, 2])


@pytest.mark.parametrize(
    ("total", "shares", "minimum", "expected"),
    [
        (10, [1, 1], 1, [5, 5]),
        (10, [3, 1], 1, [7, 3]),
        (7, [1, 1, 1], 1, [3, 2, 2]),
        (5, [100, 1, 1], 1, [3, 1, 1]),
        (4, [0, 1], 0, [0, 4]),
    ],
)
def test_proportional_sizes(total, shares, minimum, expected):
    assert proportional_sizes(total, shares, minimum) == expected


def test_proportional_sizes_errors():
    with pytest.raises(ValueError, match="at least 1 each"):
        proportional_sizes(2, [1, 1, 1])
    with pytest.raises(ValueError, match="not all zero"):
        proportional_sizes(2, [0, 0])


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_sized_cut_property(data):
    n_filters = data.draw(st.integers(min_value=2, max_value=20))
    k = data.draw(st.integers(min_value=1, max_value=n_filters))
    shares = data.draw(st.lists(st.floats(0.1, 10.0), min_size=k, max_size=k))
    sizes = proportional_sizes(n_filters, shares)
    rng = np.random.default_rng(data.draw(st.integers(0, 100)))
    weights = rng.random((n_filters, n_filters)) * (rng.random((n_filters, n_filters)) < 0.5)
    weights = np.triu(weights, 1)
    weights = weights + weights.T
    parts = normalized_cut(weights, k, sizes=sizes)
    assert_partition(parts, n_filters, k)
    assert sorted(p.size for p in parts) == sorted(sizes)
