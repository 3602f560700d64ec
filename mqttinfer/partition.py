"""Knowledge partitioning: the filter activation network and ways to cut it into K parts.

The teacher's final convolution has C filters. For every validation image n, ``acts[n, i]``
is the spatial mean of filter i's output (its *average activity*, NoNN §4.2). From those we
build a weighted, undirected graph over filters (:func:`activation_network`) and split it:

- RoCoIn (§IV-B.2): :func:`normalized_cut` into exactly K parts (spectral relaxation on the
  normalized Laplacian, then a discretisation of the eigenvectors);
- NoNN (§4.2): :func:`louvain_communities` (modularity, resolution γ), optionally dropping the
  useless community P0 (:func:`useless_community`), then :func:`merge_into_k` to get K
  partitions of nearly equal size.

Every function returns partitions as sorted ``int64`` arrays of filter ids, the list ordered
by smallest id, so two runs with the same inputs and seed give byte-identical plans.
Pure numpy / scipy / networkx: no torch, no I/O.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from typing import Literal

import networkx as nx
import numpy as np
import numpy.typing as npt
from scipy.cluster.vq import kmeans2
from scipy.linalg import eigh
from scipy.optimize import linear_sum_assignment

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IdArray = npt.NDArray[np.int64]
Rule = Literal["ah", "ca"]

# Temporaries of one chunk in activation_network hold about this many float32 numbers
# (C=256 → 61 images per chunk, ~16 MB): small enough for a 2-core edge build box.
_CHUNK_ELEMENTS = 4_000_000
# Restarts of k-means in the discretisation; the best one by Ncut value wins.
_KMEANS_RESTARTS = 8


# --------------------------------------------------------------------------- network


def activation_network(acts: npt.ArrayLike, rule: Rule = "ah") -> FloatArray:
    """The filter activation network F (C×C) of NoNN eq. (3).

    ``acts`` is N×C: row n holds the average activity of every filter for image n, after the
    final ReLU (so non-negative). Rules:

    - ``"ah"`` (activation hubs): F_ij = Σ_n a_ni a_nj |a_ni − a_nj|; links important filters
      to unimportant ones, so partitions end up with similar importance.
    - ``"ca"`` (co-activation): F_ij = Σ_n a_ni a_nj / (|a_ni − a_nj| + 1); links filters that
      fire together, so partitions are semantically similar filters.

    Returns a symmetric, non-negative float64 matrix with a zero diagonal.
    """
    matrix = _check_activations(acts)
    if rule not in ("ah", "ca"):
        raise ValueError(f"unknown activation rule {rule!r}; use 'ah' or 'ca'")
    n_images, n_filters = matrix.shape
    weights = np.zeros((n_filters, n_filters), dtype=np.float64)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n_filters * n_filters))
    for start in range(0, n_images, chunk):
        weights += _rule_sum(matrix[start : start + chunk], rule)
    np.fill_diagonal(weights, 0.0)
    # Summation order differs between (i, j) and (j, i) only by rounding; make it exact.
    return (weights + weights.T) / 2.0


def _check_activations(acts: npt.ArrayLike) -> npt.NDArray[np.float32]:
    matrix = np.asarray(acts)
    if matrix.ndim != 2:
        raise ValueError(
            f"activations must be a 2-D N×C array (images × filters); got shape {matrix.shape}"
        )
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"activations are empty (shape {matrix.shape}); need N ≥ 1 and C ≥ 1")
    if not np.issubdtype(matrix.dtype, np.number) or np.iscomplexobj(matrix):
        raise ValueError(f"activations must be real numbers; got dtype {matrix.dtype}")
    as_float = matrix.astype(np.float32, copy=False)
    if not np.all(np.isfinite(as_float)):
        raise ValueError("activations contain NaN or infinity")
    lowest = float(as_float.min())
    if lowest < 0.0:
        raise ValueError(
            f"activations must be non-negative (average activity after the final ReLU); "
            f"the smallest value is {lowest:g} — pass np.maximum(acts, 0) or record them "
            "after the ReLU"
        )
    return as_float


def _rule_sum(block: npt.NDArray[np.float32], rule: Rule) -> FloatArray:
    """Σ over the images of ``block`` of the rule's pairwise term (C×C)."""
    column = block[:, :, None]
    row = block[:, None, :]
    term = np.abs(column - row)
    if rule == "ca":
        term += 1.0
        np.reciprocal(term, out=term)
    term *= column
    term *= row
    summed: FloatArray = term.sum(axis=0, dtype=np.float64)
    return summed


def check_weights(weights: npt.ArrayLike) -> FloatArray:
    """Validate a filter graph: square, finite, symmetric, non-negative. Returns float64."""
    matrix = np.asarray(weights, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"weights must be a square C×C matrix; got shape {matrix.shape}")
    if matrix.shape[0] == 0:
        raise ValueError("weights are empty; the graph needs at least one filter")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("weights contain NaN or infinity")
    if float(matrix.min()) < 0.0:
        raise ValueError("weights must be non-negative")
    scale = max(1.0, float(np.abs(matrix).max()))
    if not np.allclose(matrix, matrix.T, rtol=1e-6, atol=1e-9 * scale):
        raise ValueError("weights must be symmetric (an undirected graph)")
    matrix = (matrix + matrix.T) / 2.0
    np.fill_diagonal(matrix, 0.0)
    return matrix


# --------------------------------------------------------------------------- normalized cut


def ncut_value(weights: npt.ArrayLike, parts: Sequence[npt.ArrayLike]) -> float:
    """Ncut(P_1..P_K) = Σ_k cut(P_k, complement) / vol(P_k) (RoCoIn eq. (3)).

    A part with zero volume (only isolated filters) contributes nothing.
    """
    matrix = check_weights(weights)
    degrees = matrix.sum(axis=1)
    total = 0.0
    for part in parts:
        ids = np.asarray(part, dtype=np.int64)
        volume = float(degrees[ids].sum())
        if volume <= 0.0:
            continue
        inside = float(matrix[np.ix_(ids, ids)].sum())
        total += (volume - inside) / volume
    return total


def normalized_cut(
    weights: npt.ArrayLike,
    k: int,
    seed: int = 0,
    *,
    balance: bool = False,
    sizes: Sequence[int] | None = None,
) -> list[IdArray]:
    """Split the filter graph into ``k`` parts minimising the normalized cut.

    Spectral relaxation (RoCoIn eq. (4)): the k eigenvectors of the normalized Laplacian
    I − D^-1/2 W D^-1/2 with the smallest eigenvalues, rows scaled to unit length
    (Ng–Jordan–Weiss), then discretised by seeded k-means; of several restarts the one with the
    lowest Ncut value is kept.

    Size control: with ``balance=True`` the discretisation is an optimal assignment of filters
    to k equal-size slots around the k-means centroids, so part sizes differ by at most one
    (RoCoIn balances partitions; NoNN wants students of similar size). With ``sizes`` (k
    positive integers summing to C) the parts get exactly those sizes — used for
    capacity-proportional partitions; the returned list is still ordered by smallest id, so
    match parts to sizes by ``len``.

    Isolated filters (zero degree, e.g. dead filters) carry no information for the cut; they
    are dealt to the smallest parts (or the parts short of their size) afterwards. Returns k
    non-empty, disjoint, sorted id arrays covering 0..C-1, ordered by smallest id.
    Deterministic for a given ``seed``.
    """
    matrix = check_weights(weights)
    n_filters = matrix.shape[0]
    _check_k(k, n_filters)
    targets = _target_sizes(n_filters, k, balance, sizes)
    if k == 1:
        return [np.arange(n_filters, dtype=np.int64)]
    degrees = matrix.sum(axis=1)
    active = np.flatnonzero(degrees > 0.0)
    isolated = np.flatnonzero(degrees <= 0.0)
    if isolated.size:
        log.debug("normalized_cut: %d isolated filters set aside", isolated.size)
    capacities = None if targets is None else _active_capacities(targets, active.size)
    if active.size <= k or (capacities is not None and min(capacities) == 0):
        return _deal_few(active, isolated, k, targets)
    sub = matrix[np.ix_(active, active)]
    embedding = _spectral_embedding(sub, k)
    rng = np.random.default_rng(seed)
    best_parts: list[IdArray] | None = None
    best_value = math.inf
    for _ in range(_KMEANS_RESTARTS):
        labels = _discretise(embedding, k, rng, capacities)
        local_parts = _labels_to_parts(labels, k)
        value = ncut_value(sub, local_parts)
        if value < best_value - 1e-12:
            best_value, best_parts = value, local_parts
    assert best_parts is not None
    return _finish([[int(n) for n in active[part]] for part in best_parts], isolated, targets)


def _deal_few(
    active: IdArray, isolated: IdArray, k: int, targets: list[int] | None
) -> list[IdArray]:
    """Too few connected filters to cut: deal them out, then top up with isolated ones."""
    if targets is None:
        buckets: list[list[int]] = [[] for _ in range(k)]
        for slot, node in enumerate(active):
            buckets[slot % k].append(int(node))
        return _finish(buckets, isolated, None)
    pool = [int(node) for node in active]
    order = sorted(range(k), key=lambda i: (-targets[i], i))
    buckets = [[] for _ in range(k)]
    for slot in itertools.cycle(order):
        if not pool:
            break
        if len(buckets[slot]) < targets[slot]:
            buckets[slot].append(pool.pop(0))
    return _finish(buckets, isolated, targets)


def _target_sizes(
    n_filters: int, k: int, balance: bool, sizes: Sequence[int] | None
) -> list[int] | None:
    if sizes is not None:
        wanted = [int(size) for size in sizes]
        if len(wanted) != k or sum(wanted) != n_filters or min(wanted) < 1:
            raise ValueError(
                f"sizes {wanted} must be {k} positive integers summing to {n_filters} filters"
            )
        return wanted
    if balance:
        return [n_filters // k + (1 if index < n_filters % k else 0) for index in range(k)]
    return None


def _active_capacities(targets: list[int], n_active: int) -> list[int]:
    """How many connected filters each part takes so isolated ones can top it up to size."""
    capacities = proportional_sizes(n_active, targets, minimum=0)
    return [min(capacity, target) for capacity, target in zip(capacities, targets, strict=True)]


def proportional_sizes(total: int, shares: Sequence[float], minimum: int = 1) -> list[int]:
    """Split ``total`` into integers proportional to ``shares`` (largest remainder method),
    each at least ``minimum``; raises ValueError when that is impossible."""
    weights = np.asarray(shares, dtype=np.float64)
    if weights.ndim != 1 or weights.size == 0 or not np.all(np.isfinite(weights)):
        raise ValueError(f"shares must be a non-empty list of finite numbers; got {list(shares)}")
    if np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError("shares must be non-negative and not all zero")
    if minimum * weights.size > total:
        raise ValueError(f"cannot give {weights.size} parts at least {minimum} each out of {total}")
    spare = total - minimum * weights.size
    exact = weights / weights.sum() * spare
    sizes = np.floor(exact).astype(np.int64)
    remainder = spare - int(sizes.sum())
    # Largest fractional parts first; ties go to the larger share, then the lower index.
    order = sorted(range(weights.size), key=lambda i: (-(exact[i] - sizes[i]), -weights[i], i))
    for index in order[:remainder]:
        sizes[index] += 1
    return [int(size) + minimum for size in sizes]


def _check_k(k: int, n_filters: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer; got {k!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}")
    if k > n_filters:
        raise ValueError(
            f"cannot split {n_filters} filters into k={k} non-empty partitions; "
            f"use k ≤ {n_filters} (fewer device groups) or a teacher with more filters"
        )


def _spectral_embedding(matrix: FloatArray, k: int) -> FloatArray:
    """Rows of the k bottom eigenvectors of the normalized Laplacian, scaled to unit norm."""
    degrees = matrix.sum(axis=1)
    inv_sqrt = 1.0 / np.sqrt(degrees)
    normalized = matrix * inv_sqrt[:, None] * inv_sqrt[None, :]
    size = matrix.shape[0]
    # Smallest eigenvalues of I − M are the largest of M; eigh sorts ascending.
    _, vectors = eigh(normalized, subset_by_index=[size - k, size - 1])
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0.0] = 1.0
    embedded: FloatArray = vectors / norms
    return embedded


def _discretise(
    embedding: FloatArray, k: int, rng: np.random.Generator, capacities: list[int] | None
) -> npt.NDArray[np.int64]:
    centroids, labels = kmeans2(embedding, k, iter=30, minit="++", seed=rng, missing="warn")
    labels = np.asarray(labels, dtype=np.int64)
    if capacities is None:
        return _fill_empty_clusters(embedding, labels, k)
    # The naturally largest cluster takes the largest capacity, and so on; label j of the
    # result has exactly capacities[j] members.
    natural = np.bincount(labels, minlength=k)
    by_natural = np.argsort(-natural, kind="stable")
    by_capacity = np.argsort(-np.asarray(capacities), kind="stable")
    ordered = np.asarray(centroids, dtype=np.float64)[by_natural]
    slot_labels = _balanced_labels(embedding, ordered, np.asarray(capacities)[by_capacity])
    return by_capacity[slot_labels].astype(np.int64)


def _balanced_labels(
    embedding: FloatArray, centroids: FloatArray, capacity: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Assign points to centroids, ``capacity[j]`` points each, minimising total distance."""
    slot_owner = np.repeat(np.arange(centroids.shape[0]), capacity)
    distance = np.linalg.norm(embedding[:, None, :] - centroids[None, :, :], axis=2)
    rows, cols = linear_sum_assignment(distance[:, slot_owner])
    labels = np.empty(embedding.shape[0], dtype=np.int64)
    labels[rows] = slot_owner[cols]
    return labels


def _fill_empty_clusters(
    embedding: FloatArray, labels: npt.NDArray[np.int64], k: int
) -> npt.NDArray[np.int64]:
    """k-means may leave a cluster empty; move the worst-fitting points of big clusters in."""
    labels = labels.copy()
    for cluster in range(k):
        if np.any(labels == cluster):
            continue
        sizes = np.bincount(labels, minlength=k)
        donor = int(np.argmax(sizes))
        members = np.flatnonzero(labels == donor)
        centre = embedding[members].mean(axis=0)
        farthest = members[int(np.argmax(np.linalg.norm(embedding[members] - centre, axis=1)))]
        labels[farthest] = cluster
    return labels


def _labels_to_parts(labels: npt.NDArray[np.int64], k: int) -> list[IdArray]:
    return [np.flatnonzero(labels == cluster).astype(np.int64) for cluster in range(k)]


def _finish(
    buckets: list[list[int]], leftovers: IdArray, targets: list[int] | None
) -> list[IdArray]:
    """Deal leftover (isolated) filters to the parts, then sort everything.

    Without targets each leftover goes to the currently smallest part; with targets, to the
    part furthest below its target size.
    """
    for node in leftovers:
        if targets is None:
            chosen = min(range(len(buckets)), key=lambda i: (len(buckets[i]), i))
        else:
            chosen = max(range(len(buckets)), key=lambda i: (targets[i] - len(buckets[i]), -i))
        buckets[chosen].append(int(node))
    return _canonical([np.array(bucket, dtype=np.int64) for bucket in buckets])


def _canonical(parts: Sequence[npt.ArrayLike]) -> list[IdArray]:
    sorted_parts = [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]
    non_empty = [part for part in sorted_parts if part.size]
    return sorted(non_empty, key=lambda part: int(part[0]))


# --------------------------------------------------------------------------- communities


def louvain_communities(
    weights: npt.ArrayLike,
    resolution: float = 1.0,
    seed: int = 0,
    *,
    isolation_tol: float = 0.0,
) -> list[IdArray]:
    """Modularity communities of the filter graph (networkx Louvain, NoNN eq. (5)).

    Filters whose total link weight is ≤ ``isolation_tol`` × the largest filter's are treated
    as disconnected and pooled into a single community — NoNN's g0, the candidate P0 — rather
    than returned as one singleton each. Ordered by smallest id; deterministic per seed.
    """
    matrix = check_weights(weights)
    if not resolution > 0.0 or not math.isfinite(resolution):
        raise ValueError(f"resolution must be a positive number; got {resolution!r}")
    isolated = _isolated_nodes(matrix, isolation_tol)
    connected = np.setdiff1d(np.arange(matrix.shape[0]), isolated)
    communities: list[IdArray] = []
    if connected.size:
        graph = nx.from_numpy_array(matrix[np.ix_(connected, connected)])
        found = nx.community.louvain_communities(
            graph, weight="weight", resolution=resolution, seed=seed
        )
        communities = [connected[sorted(community)] for community in found]
    if isolated.size:
        communities.append(isolated)
    return _canonical(communities)


def _isolated_nodes(matrix: FloatArray, isolation_tol: float) -> IdArray:
    strength = matrix.sum(axis=1)
    limit = isolation_tol * float(strength.max()) if strength.size else 0.0
    return np.flatnonzero(strength <= limit).astype(np.int64)


def useless_community(
    weights: npt.ArrayLike,
    communities: Sequence[npt.ArrayLike],
    *,
    weak_fraction: float = 0.05,
) -> int | None:
    """Index of NoNN's P0 candidate among ``communities``, or None when there is none.

    P0 is the community of disconnected filters (zero link weight: they never fire). Failing
    that, the weakest community — lowest mean filter strength — is a candidate when its mean
    strength is below ``weak_fraction`` × the median of the communities' mean strengths. It is
    only a *candidate*: NoNN drops it only if the teacher's validation accuracy does not change,
    which the training pipeline must check.
    """
    matrix = check_weights(weights)
    arrays = _check_disjoint(communities, matrix.shape[0])
    if len(arrays) < 2:
        return None
    strength = matrix.sum(axis=1)
    means = np.array([float(strength[ids].mean()) for ids in arrays])
    zero = np.flatnonzero(means <= 0.0)
    if zero.size:
        sizes = [arrays[int(index)].size for index in zero]
        return int(zero[int(np.argmax(sizes))])
    weakest = int(np.argmin(means))
    if means[weakest] < weak_fraction * float(np.median(means)):
        return weakest
    return None


def _check_disjoint(parts: Sequence[npt.ArrayLike], n_filters: int) -> list[IdArray]:
    arrays = [np.asarray(part, dtype=np.int64).ravel() for part in parts]
    if any(array.size == 0 for array in arrays):
        raise ValueError("communities must not be empty")
    joined = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    if joined.size and (joined.min() < 0 or joined.max() >= n_filters):
        raise ValueError(f"community ids must lie in 0..{n_filters - 1}")
    if np.unique(joined).size != joined.size:
        raise ValueError("communities overlap: a filter id appears in more than one")
    return arrays


# --------------------------------------------------------------------------- merging


def merge_into_k(
    communities: Sequence[npt.ArrayLike], k: int, weights: npt.ArrayLike | None = None
) -> list[IdArray]:
    """Combine (and if needed split) communities into ``k`` partitions of near-equal size.

    NoNN §4.2: communities larger than ⌈total/k⌉ are split first — by a balanced normalized
    cut of their own subgraph when ``weights`` are given, otherwise into contiguous id runs —
    then pieces are packed largest-first into the currently smallest partition (LPT). Ties go
    to the partition the piece is most strongly linked to. NoNN's example {12, 14, 25, 30}
    into 2 gives {30+12, 25+14} = {42, 39}.
    """
    matrix = None if weights is None else check_weights(weights)
    universe = None if matrix is None else matrix.shape[0]
    total_ids = sum(len(np.asarray(c).ravel()) for c in communities)
    arrays = _check_disjoint(
        communities, universe if universe is not None else _max_id(communities)
    )
    _check_k(k, total_ids)
    target = math.ceil(total_ids / k)
    pieces: list[IdArray] = []
    for community in arrays:
        pieces.extend(_split(community, math.ceil(community.size / target), matrix))
    while len(pieces) < k:
        pieces.sort(key=lambda piece: (-piece.size, int(piece.min())))
        pieces = _split(pieces[0], 2, matrix) + pieces[1:]
    return _pack(pieces, k, matrix)


def _max_id(communities: Sequence[npt.ArrayLike]) -> int:
    largest = [int(np.max(np.asarray(c))) for c in communities if np.asarray(c).size]
    return (max(largest) + 1) if largest else 0


def _split(community: IdArray, pieces: int, matrix: FloatArray | None) -> list[IdArray]:
    ordered = np.sort(community)
    if pieces <= 1:
        return [ordered]
    if matrix is not None and ordered.size > pieces:
        sub = matrix[np.ix_(ordered, ordered)]
        if float(sub.sum()) > 0.0:
            local = normalized_cut(sub, pieces, seed=0, balance=True)
            return [ordered[part] for part in local]
    return [chunk.astype(np.int64) for chunk in np.array_split(ordered, pieces)]


def _pack(pieces: list[IdArray], k: int, matrix: FloatArray | None) -> list[IdArray]:
    order = sorted(pieces, key=lambda piece: (-piece.size, int(piece.min())))
    bins: list[list[int]] = [[] for _ in range(k)]
    for piece in order:
        loads = [len(content) for content in bins]
        lightest = min(loads)
        candidates = [index for index, load in enumerate(loads) if load == lightest]
        chosen = candidates[0]
        if matrix is not None and len(candidates) > 1:
            links = [
                float(matrix[np.ix_(piece, np.array(bins[i], dtype=np.int64))].sum())
                if bins[i]
                else 0.0
                for i in candidates
            ]
            chosen = candidates[int(np.argmax(links))]
        bins[chosen].extend(int(node) for node in piece)
    return _canonical([np.array(content, dtype=np.int64) for content in bins])


# --------------------------------------------------------------------------- reporting


def partition_sizes_report(parts: Sequence[npt.ArrayLike]) -> str:
    """One line: how many partitions, their sizes, and the spread (for logs and the CLI)."""
    sizes = [len(np.asarray(part).ravel()) for part in parts]
    if not sizes:
        return "0 partitions"
    return (
        f"{len(sizes)} partitions of {sum(sizes)} filters: sizes {sizes} "
        f"(min {min(sizes)}, max {max(sizes)}, spread {max(sizes) - min(sizes)})"
    )


def contiguous_partitions(n_filters: int, sizes: Sequence[int]) -> list[IdArray]:
    """Consecutive filter id ranges of the given sizes (used when no activations exist)."""
    if any(size < 1 for size in sizes):
        raise ValueError(f"every partition needs at least one filter; sizes {list(sizes)}")
    if sum(sizes) != n_filters:
        raise ValueError(f"sizes {list(sizes)} sum to {sum(sizes)}, not {n_filters} filters")
    bounds = np.cumsum([0, *sizes])
    return [np.arange(bounds[i], bounds[i + 1], dtype=np.int64) for i in range(len(sizes))]
