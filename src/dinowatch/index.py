"""In-memory vector index: exact cosine top-k over a float32 matrix.

Exact search is the right tool at an appliance's scale: 100k vectors of 384 floats are
150 MB and one matrix-vector product (see `benchmarks/index_bench.py` for the figures).
Rows are kept L2-normalized, so a dot product is the cosine similarity. Removing a key
moves the last row into its place: the matrix stays dense and no rebuild is needed.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)

INITIAL_CAPACITY = 1024
# float32 scores of equal vectors differ by a few units in the last place (~1e-7)
SCORE_NOISE = 1e-5


@dataclass(frozen=True)
class Hit(Generic[K]):
    key: K
    score: float  # cosine similarity, -1..1


def normalized(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm as float32 (a zero row stays zero)."""
    out = np.array(vectors, dtype=np.float32, ndmin=2, copy=True)
    _scale_rows(out)
    return out


def _scale_rows(rows: np.ndarray) -> None:
    """Scale the rows of a 2-D float32 array to unit length, in place, with no (N, dim)
    temporary (np.linalg.norm squares into one; a masked divide is slow)."""
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    norms[norms == 0] = 1  # a zero row stays zero
    rows /= norms[:, None]


class VectorIndex(Generic[K]):
    """Keys -> unit vectors of one dimension; thread-safe.

    `add` replaces a key's vector; `remove` of an unknown key is a no-op.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._matrix = np.zeros((INITIAL_CAPACITY, dim), dtype=np.float32)
        self._keys: list[K] = []
        self._rows: dict[K, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def __iter__(self) -> Iterator[K]:
        """The keys, as they were when iteration began."""
        with self._lock:
            return iter(list(self._keys))

    def vector(self, key: K) -> np.ndarray | None:
        """The stored (normalized) vector of `key`, shape (dim,), or None."""
        with self._lock:
            row = self._rows.get(key)
            return None if row is None else self._matrix[row].copy()

    def add(self, key: K, vector: np.ndarray) -> None:
        """Insert or replace; `vector` has shape (dim,) and is normalized here."""
        self.add_many([key], np.asarray(vector).reshape(1, -1))

    def add_many(self, keys: Iterable[K], vectors: np.ndarray) -> None:
        """Insert or replace many at once: `vectors` is (N, dim), one row per key."""
        keys = list(keys)
        rows = self._checked(keys, normalized(vectors))
        with self._lock:
            self._reserve(len(self._keys) + len(keys))
            places = []
            for key in keys:
                row = self._rows.get(key)
                if row is None:
                    row = self._rows[key] = len(self._keys)
                    self._keys.append(key)
                places.append(row)
            self._matrix[places] = rows

    def load(self, keys: Iterable[K], vectors: np.ndarray) -> None:
        """Replace the contents with `keys` (distinct) and `vectors`, (N, dim) float32, which
        become the index's own matrix, normalized in place: no copy of what may be hundreds
        of megabytes, so the caller must not use `vectors` afterwards."""
        keys = list(keys)
        matrix = self._checked(keys, np.ascontiguousarray(vectors, dtype=np.float32))
        if len(set(keys)) != len(keys):
            raise ValueError("keys must be distinct")
        _scale_rows(matrix)
        with self._lock:
            self._matrix = matrix if len(keys) else np.zeros((INITIAL_CAPACITY, self.dim),
                                                             dtype=np.float32)
            self._keys = keys
            self._rows = {key: row for row, key in enumerate(keys)}

    def _checked(self, keys: list[K], rows: np.ndarray) -> np.ndarray:
        if rows.size == 0 and not keys:
            return rows.reshape(0, self.dim)
        if rows.shape != (len(keys), self.dim):
            raise ValueError(f"expected {len(keys)} vectors of dimension {self.dim}, "
                             f"got shape {rows.shape}")
        return rows

    def remove(self, key: K) -> bool:
        """Drop `key`; False if it was not there."""
        with self._lock:
            row = self._rows.pop(key, None)
            if row is None:
                return False
            last = len(self._keys) - 1
            if row != last:  # the last row fills the hole
                moved = self._keys[last]
                self._matrix[row] = self._matrix[last]
                self._keys[row] = moved
                self._rows[moved] = row
            self._keys.pop()
            return True

    def search(self, query: np.ndarray, k: int, *, min_score: float = -1.0,
               exclude: Iterable[K] = ()) -> list[Hit[K]]:
        """The `k` keys most similar to `query` (shape (dim,)), best first, each with a
        cosine ≥ `min_score`, leaving out the keys in `exclude`."""
        unit = normalized(query).reshape(-1)
        if unit.shape != (self.dim,):
            raise ValueError(f"query has dimension {unit.size}, the index {self.dim}")
        skip = set(exclude)
        with self._lock:
            count = len(self._keys)
            if count == 0 or k <= 0:
                return []
            scores = self._matrix[:count] @ unit
            wanted = min(count, k + len(skip))
            if wanted < count:  # every row as good as the wanted-th: ties are cut by key
                kth = np.partition(scores, count - wanted)[count - wanted]
                best = np.flatnonzero(scores >= kth - SCORE_NOISE)
            else:
                best = np.arange(count)
            # BLAS sums a row in an order that depends on where the row sits, so two equal
            # vectors can score a bit apart; the few candidates are scored again in float64,
            # where equal rows score equal, and their ties are then cut by key.
            exact = (self._matrix[best].astype(np.float64) @ unit.astype(np.float64))
            hits = [Hit(self._keys[row], float(np.float32(score)))
                    for row, score in zip(best.tolist(), exact.tolist(), strict=True)]
        # Equal scores in key order, not row order (which adds, removals and a reload from
        # the store each change): the same question gets the same answer.
        hits.sort(key=lambda hit: (-hit.score, str(hit.key)))
        return [hit for hit in hits if hit.key not in skip and hit.score >= min_score][:k]

    def _reserve(self, rows: int) -> None:
        if rows <= len(self._matrix):
            return
        grown = np.zeros((max(rows, 2 * len(self._matrix)), self.dim), dtype=np.float32)
        grown[: len(self._keys)] = self._matrix[: len(self._keys)]
        self._matrix = grown
