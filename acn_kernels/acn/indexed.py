"""Example indices for data sets that have none.

A :class:`~acn_kernels.CodeBank` stores one code per training example and needs each batch's
example indices (its rows). Most data sets return ``(image, label)`` without one;
:class:`IndexedDataset` adds it, so that a ``DataLoader`` yields ``(index, image, label)`` with
``index`` an int64 tensor ready for the bank (docs/acn.md, "Porting an existing ACN codebase").
"""

from __future__ import annotations

import operator
from typing import Any

from torch.utils.data import Dataset, IterableDataset


class IndexedDataset(Dataset):
    """Wraps a map-style data set so that item i is ``(i, *dataset[i])``.

    A plain tuple item is flattened after the index (``(x, y)`` -> ``(i, x, y)``); any other item
    (a tensor, a dict, a named tuple) is kept whole (``x`` -> ``(i, x)``). The index is a Python
    int, which the default collate turns into an int64 tensor [B]. An example's bank row is its
    position in the wrapped data set: build the bank with ``len(dataset)`` rows and wrap the same
    data set the loader reads (wrap a ``Subset`` to index its positions, not the parent's).

    Iterable-style data sets have no stable position per example and are rejected.
    """

    def __init__(self, dataset: Any) -> None:
        if isinstance(dataset, IterableDataset):
            raise TypeError("dataset is an IterableDataset, which has no example index; number the "
                            "examples in its iterator instead (the bank needs the same index every pass)")
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(f"dataset must be a map-style data set (with __getitem__ and __len__), got "
                            f"{type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        i = operator.index(i)
        item = self.dataset[i]
        return (i, *item) if type(item) is tuple else (i, item)


__all__ = ["IndexedDataset"]
