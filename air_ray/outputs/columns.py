"""Arrow helpers shared by the readers of score partitions (select, report): a column as float64 numpy, dense
codes for domain values, and the top k rows of a stream of tables. No Python object per row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from air_ray.errors import AirRayError


def float_column(batch, name: str = "score") -> np.ndarray:
    """Column ``name`` as float64 numpy, nulls as NaN (zero-copy when it is float64 without nulls)."""
    col = batch.column(name)
    if col.type != pa.float64():
        col = pc.cast(col, pa.float64())
    if col.null_count:
        col = pc.fill_null(col, np.nan)
    return np.asarray(col.to_numpy(zero_copy_only=False), np.float64)


def top_k(tables, k: int, sort_keys) -> pa.Table:
    """The first ``k`` rows of ``tables`` (one table or a list) by ``sort_keys``, in no particular order."""
    t = tables if isinstance(tables, pa.Table) else (pa.concat_tables(tables) if len(tables) > 1 else tables[0])
    if t.num_rows <= k:
        return t
    t = t.combine_chunks()
    return t.take(pc.select_k_unstable(t, k=k, sort_keys=sort_keys))


class DomainCodes:
    """Dense ids for domain values (``None`` = null domain), assigned in order of first appearance."""

    def __init__(self):
        self.ids: dict = {}
        self.keys: list = []

    def __len__(self) -> int:
        return len(self.keys)

    def encode(self, arr: pa.Array, grow: bool = True) -> np.ndarray:
        """[rows] int64 codes of ``arr``'s values; ``grow=False``: a value not seen before is an error."""
        enc = pc.dictionary_encode(arr, null_encoding="encode")
        local = enc.dictionary.to_pylist()  # the distinct values of this batch only
        lut = np.empty(len(local), np.int64)
        for i, v in enumerate(local):
            g = self.ids.get(v)
            if g is None:
                if not grow:
                    raise AirRayError("the scores changed while they were read (a new domain appeared); run it again")
                g = self.ids[v] = len(self.keys)
                self.keys.append(v)
            lut[i] = g
        return lut[enc.indices.to_numpy(zero_copy_only=False)]
