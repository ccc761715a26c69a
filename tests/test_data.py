"""Data loading of the ACN layer (acn_kernels.acn.data): IDX parsing, raw and gzipped, and the
errors broken or hostile files get (bounded memory, the file named)."""

from __future__ import annotations

import gzip
import struct
import tracemalloc

import numpy as np
import pytest
import torch

from acn_kernels.acn import data


def _idx(dims: tuple[int, ...], payload: bytes, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    a = np.arange(24, dtype=">i2").reshape(2, 3, 4)
    blob = _idx(a.shape, a.tobytes(), code=0x0B)
    path = tmp_path / ("x.gz" if gz else "x")
    path.write_bytes(gzip.compress(blob) if gz else blob)
    out = data.read_idx(path)
    assert out.dtype == np.int16 and out.shape == (2, 3, 4)
    assert np.array_equal(out, a)


def test_gzip_bomb_is_rejected_without_inflating_it(tmp_path):
    """A small .gz whose payload inflates far beyond its header's shape: rejected after reading
    one byte past the shape, not after inflating everything."""
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(_idx((10, 28, 28), bytes(200 << 20)), compresslevel=9))
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="more data than the header"):
            data.read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


def test_header_beyond_the_size_limit(tmp_path):
    path = tmp_path / "huge.gz"
    path.write_bytes(gzip.compress(_idx((60000, 4096, 4096), b"")))
    with pytest.raises(ValueError, match="limit"):
        data.read_idx(path)
    with pytest.raises(ValueError, match="limit"):
        data.read_idx(tmp_path / "huge.gz", max_bytes=100)


def test_truncated_gzip_names_the_file(tmp_path):
    whole = gzip.compress(_idx((100, 28, 28), bytes(range(256)) * 306 + bytes(64)))
    path = tmp_path / "cut-images.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="cut-images.gz"):
        data.read_idx(path)


def test_truncated_raw_file_names_the_file(tmp_path):
    path = tmp_path / "short-idx"
    path.write_bytes(_idx((10, 5), bytes(20)))
    with pytest.raises(ValueError, match="short-idx.*truncated"):
        data.read_idx(path)


def test_float_labels_error_names_the_dtype():
    x = torch.zeros(6, 1, 4, 4)
    with pytest.raises(TypeError, match="train_y must be an integer tensor, got dtype torch.float32"):
        data.from_tensors(x, torch.zeros(6))
    with pytest.raises(ValueError, match=r"train_y must have shape \[6\], got \(5,\)"):
        data.from_tensors(x, torch.zeros(5, dtype=torch.int64))
