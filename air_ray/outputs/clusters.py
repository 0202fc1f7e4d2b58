"""Seeded k-means on the scores' ``embedding`` column, for ``select --diversity K`` (diversity quotas).

The embedding of a row (``score --embed``) is the base model's last hidden state mean-pooled over the response
tokens, projected to ``EMBED_DIMS`` dimensions (``air_ray.influence.embed``). Clustering:

* the fit uses at most ``FIT_SAMPLE`` rows, evenly spaced over the partitions' order (every row of a smaller pool);
* each vector is centred on the sample's mean and scaled to unit length (the pooled states of a language model share
  a large common direction; after this, squared distance is 2 - 2 cos);
* k-means++ seeding from ``numpy.random.default_rng(seed)``, then Lloyd's iterations until no assignment changes
  (at most ``MAX_ITER``); a cluster left empty is re-seeded with the point farthest from its centre;
* every row is assigned to its nearest centre (ties to the lower index), batch by batch, with the same centring.

Deterministic for one pool and seed, on any machine with IEEE float64. Memory: the sample (``FIT_SAMPLE`` x dims
float64, 32 MB) and K centres; assignment is per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from air_ray.errors import AirRayError

FIT_SAMPLE = 65_536  # rows the centres are fitted on
MAX_ITER = 100


def vectors(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(X [rows, dims] float64, present [rows] bool)`` of an embedding column (fixed-size or variable lists of
    floats; null rows are not present, their X rows are 0)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    present = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), bool) if n else np.zeros(0, bool)
    if not present.any():
        return np.zeros((n, 0)), present
    values = column.flatten() if column.null_count == 0 else column.filter(pa.array(present)).flatten()
    flat = np.asarray(values.to_numpy(zero_copy_only=False), np.float64)
    dims = len(flat) // int(present.sum())
    x = np.zeros((n, dims))
    x[present] = flat.reshape(-1, dims)
    return x, present


@dataclass
class Clusters:
    """Fitted centres: ``assign(X)`` gives each row's cluster."""

    centres: np.ndarray  # [K, dims], in the normalised space
    mean: np.ndarray  # [dims], the fit sample's mean
    iterations: int
    inertia: float  # sum of squared distances of the fit sample to its centres (normalised space)
    sample_rows: int

    @property
    def k(self) -> int:
        return len(self.centres)

    def assign(self, x: np.ndarray) -> np.ndarray:
        """[rows] int64: the nearest centre of each row of ``x`` [rows, dims]."""
        if not len(x):
            return np.zeros(0, np.int64)
        return _nearest(_normalise(x, self.mean), self.centres)[0]


def _normalise(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    z = x - mean
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    return np.divide(z, norm, out=np.zeros_like(z), where=norm > 0)


def _nearest(z: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest centre, squared distance to it) per row; ties go to the lower index (argmin)."""
    d2 = (z * z).sum(1)[:, None] - 2.0 * z @ centres.T + (centres * centres).sum(1)[None, :]
    np.maximum(d2, 0.0, out=d2)
    idx = d2.argmin(1)
    return idx.astype(np.int64), d2[np.arange(len(z)), idx]


def fit(x: np.ndarray, k: int, seed: int) -> Clusters:
    """k-means of the sample ``x`` [rows, dims] into ``k`` clusters (see the module doc)."""
    n = len(x)
    if k < 1:
        raise AirRayError(f"select --diversity {k}: the number of groups must be >= 1")
    if n < k:
        raise AirRayError(f"select --diversity {k}: only {n} rows have an embedding; ask for at most {n} groups")
    mean = x.mean(0)
    z = _normalise(x, mean)
    rng = np.random.default_rng(seed)
    centres = np.empty((k, z.shape[1]))
    centres[0] = z[rng.integers(n)]
    d2 = ((z - centres[0]) ** 2).sum(1)
    for j in range(1, k):  # k-means++: the next centre drawn in proportion to the squared distance
        total = d2.sum()
        i = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        centres[j] = z[i]
        d2 = np.minimum(d2, ((z - centres[j]) ** 2).sum(1))
    assign = None
    it = 0
    for it in range(1, MAX_ITER + 1):
        new, dist = _nearest(z, centres)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        counts = np.bincount(assign, minlength=k)
        sums = np.zeros_like(centres)
        np.add.at(sums, assign, z)
        for j in range(k):
            if counts[j]:
                centres[j] = sums[j] / counts[j]
            else:  # empty: the point farthest from its centre starts it again
                far = int(dist.argmax())
                centres[j] = z[far]
                dist[far] = 0.0
    _, dist = _nearest(z, centres)
    return Clusters(centres, mean, it, float(dist.sum()), n)
