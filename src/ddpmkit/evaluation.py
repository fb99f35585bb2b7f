"""Sample quality: FID and precision/recall of generated images, on a network's features.

* FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule ..."): the
  Frechet distance between Gaussians fitted to the features of real and generated
  images, d^2 = ||mu_r - mu_g||^2 + Tr(C_r + C_g - 2 (C_r C_g)^{1/2}).
* Precision and recall (Kynkaanniemi et al. 2019, "Improved precision and recall metric
  for assessing generative models", section 2): the real manifold is the union of balls
  around each real feature vector, of radius its distance to its k-th nearest real
  neighbour; precision is the fraction of generated points inside it, recall the
  fraction of real points inside the generated manifold built the same way.

Feature spaces (``FeatureExtractor``): the penultimate layer of a small classifier
trained on the dataset (classifier.py; the poster's choice for 28x28 grayscale data) or
the standard FID Inception-v3 pool3 features (``inception_extractor``). Every result
names the extractor and the SHA-256 of its weights file: FIDs on different feature
spaces are not comparable.

Images enter an extractor as uint8, so generated samples (floats in [-1, 1]) are
quantised exactly as a saved PNG would be, and compared with real images on equal terms.

Reference features of a dataset split are cached in ``<cache>/stats/`` (cache_root() of
classifier.py) and reused. ``compute_fid`` can keep the features of finished generated
batches in a work directory and resume from the first unfinished batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import TrainedModel, file_sha256, load_weights, write_atomically
from .classifier import cache_root, find_classifier, load_classifier, safe_name
from .data import ImageDataset, Split, load_dataset, to_model_range, to_uint8
from .errors import CheckpointError, ConfigError, DdpmError
from .samplers import DEFAULT_SPACING, sample_batches
from .schedules import NoiseSchedule

FeatureKind = Literal["classifier", "inception"]
FEATURE_KINDS: tuple[str, ...] = get_args(FeatureKind)
PRECISION_RECALL_K = 3  # Kynkaanniemi et al. use k = 3 throughout
# Both sets are cut to the same size for precision/recall (the k-NN radii shrink as a set
# grows, so unequal sizes would bias the two numbers); the cut is a fixed random subset.
_SUBSET_SEED = 0
# Distance blocks of precision/recall hold at most this many float32 entries (64 MiB).
_DISTANCE_BLOCK_ENTRIES = 1 << 24


# --- Frechet distance -------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class FeatureStats:
    """Mean (D,) and covariance (D, D) in float64 of n feature vectors."""

    mean: np.ndarray
    cov: np.ndarray
    n: int

    @classmethod
    def from_features(cls, features: np.ndarray | torch.Tensor) -> FeatureStats:
        features = _as_float64(features)
        if features.ndim != 2 or len(features) < 2:
            raise ConfigError(f"feature statistics need an (N, D) array with N >= 2, got shape {features.shape}")
        # Unbiased covariance (N - 1), as the reference FID implementations compute it;
        # the reshape keeps D = 1 a (1, 1) matrix (np.cov returns a scalar there).
        covariance = np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])
        return cls(features.mean(axis=0), covariance, len(features))


def frechet_distance(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """The Frechet distance between Gaussians fitted to two (N, D) feature sets."""
    a, b = FeatureStats.from_features(features_a), FeatureStats.from_features(features_b)
    return frechet_distance_from_stats(a.mean, a.cov, b.mean, b.cov)


def frechet_distance_from_stats(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(C1) + Tr(C2) - 2 Tr((C1 C2)^{1/2}), in float64.

    Tr((C1 C2)^{1/2}) is computed without a general matrix square root, so that singular
    covariances (fewer samples than dimensions, dead or duplicated features) give a
    finite real value instead of NaN or complex numbers. With S = C1^{1/2} the
    symmetric square root of C1, C1 C2 = S (S C2); and for any A, B the products AB and
    BA have the same non-zero eigenvalues, so C1 C2 has those of S C2 S. That matrix is
    symmetric positive semi-definite, so its eigenvalues lambda_i are real and >= 0, and
    the principal square root of C1 C2 has eigenvalues sqrt(lambda_i): its trace is
    sum_i sqrt(lambda_i). No inverse is needed, so nothing breaks when C1 is singular.
    Eigenvalues that rounding pushes slightly below 0 are clamped to 0.
    """
    mu1, mu2, cov1, cov2 = (_as_float64(v) for v in (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ConfigError(f"statistics of different feature spaces: means {mu1.shape}, {mu2.shape}, covariances {cov1.shape}, {cov2.shape}")
    sqrt_cov1 = _psd_sqrt(cov1)
    middle = sqrt_cov1 @ cov2 @ sqrt_cov1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)  # symmetrised against rounding
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt
    # A distance is >= 0; rounding can leave about -1e-12 for identical statistics.
    return max(float(distance), 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a positive semi-definite matrix (negative rounding clamped)."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def _as_float64(values: np.ndarray | torch.Tensor) -> np.ndarray:
    return torch.as_tensor(values).detach().cpu().double().numpy()


# --- precision and recall ---------------------------------------------------------------------

def precision_recall(
    real_features: np.ndarray | torch.Tensor, fake_features: np.ndarray | torch.Tensor, k: int = PRECISION_RECALL_K
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eqs. 1-2) with k-NN radii.

    Distances are computed in blocks of rows, never as one N x N matrix.
    """
    real, fake = _as_float32_tensor(real_features), _as_float32_tensor(fake_features)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ConfigError(f"need two (N, D) feature sets of the same D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if k < 1 or min(len(real), len(fake)) <= k:
        raise ConfigError(f"precision/recall with k = {k} needs k >= 1 and more than k points per set, got {len(real)} and {len(fake)}")
    precision = _fraction_inside(fake, real, _knn_radii(real, k))
    recall = _fraction_inside(real, fake, _knn_radii(fake, k))
    return precision, recall


def _distance_blocks(queries: torch.Tensor, points: torch.Tensor) -> Iterable[torch.Tensor]:
    """Euclidean distances from blocks of query rows to all points."""
    rows = max(1, _DISTANCE_BLOCK_ENTRIES // len(points))
    for block in queries.split(rows):
        yield torch.cdist(block, points)


def _knn_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    # The (k+1)-th smallest distance: the smallest is each point's distance to itself.
    return torch.cat([distances.kthvalue(k + 1, dim=1).values for distances in _distance_blocks(points, points)])


def _fraction_inside(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor) -> float:
    """The fraction of queries within radii[i] of some points[i] (f(phi, Phi) of the paper)."""
    inside = sum(int((distances <= radii).any(dim=1).sum()) for distances in _distance_blocks(queries, points))
    return inside / len(queries)


def _as_float32_tensor(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values).detach().float().cpu()


# --- feature extractors ----------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class FeatureExtractor:
    """A feature network and what identifies it: ``extractor(images_uint8) -> (N, D) float32``.

    ``network`` maps float images in [-1, 1] (B, C, H, W) on ``device`` to (B, D).
    """

    name: str
    weights_sha256: str
    network: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    batch_size: int = 250

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        if images.dtype != torch.uint8:
            raise ConfigError(f"feature extractors take uint8 images, got {images.dtype}")
        with torch.inference_mode():
            parts = [self.network(to_model_range(part.to(self.device))).float().cpu() for part in images.split(self.batch_size)]
        return torch.cat(parts).numpy()

    def provenance(self) -> dict[str, str]:
        return {"extractor": self.name, "extractor_sha256": self.weights_sha256}


def classifier_extractor(path: str | Path, *, device: str | torch.device = "cpu") -> FeatureExtractor:
    """The penultimate features of the classifier saved in ``path`` (classifier.py)."""
    model, meta = load_classifier(path, device=device)
    if model.config.time_conditioned:
        raise ConfigError(f"{path} is a noisy (time-conditioned) classifier; FID needs one trained on clean images")
    return FeatureExtractor(
        name=f"classifier:{meta['report'].get('dataset', 'unknown')}",
        weights_sha256=meta["weights_sha256"],
        network=model.features,
        device=torch.device(device),
    )


def load_extractor(
    kind: FeatureKind, dataset: str, *, path: str | Path | None = None, device: str | torch.device = "cpu"
) -> FeatureExtractor:
    """``--features classifier`` (the cached classifier of ``dataset``, or ``path``) or ``inception``."""
    if kind == "classifier":
        return classifier_extractor(path or find_classifier(dataset), device=device)
    if kind == "inception":
        return inception_extractor(path, device=device)
    raise ConfigError(f"unknown feature extractor {kind!r}; choose one of {', '.join(FEATURE_KINDS)}")


def generated_features(extractor: FeatureExtractor, samples: torch.Tensor) -> np.ndarray:
    """Features of generated samples in [-1, 1], quantised to uint8 first as a saved image would be."""
    return extractor(to_uint8(samples))


# --- reference features (cached) ---------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Reference:
    """A real split's features (N, D) float32 and their statistics."""

    name: str  # "<dataset>/<split>"
    features: np.ndarray
    stats: FeatureStats


def stats_cache_dir() -> Path:
    return cache_root() / "stats"


def reference_features(dataset: ImageDataset, extractor: FeatureExtractor, *, cache_dir: str | Path | None = None) -> Reference:
    """The features of a split, from ``<cache>/stats/`` when computed before.

    The cache file is named by dataset, split, extractor hash and a hash of the images
    themselves, so that other image-size or channel options, or a changed image folder,
    never reuse stale features. A damaged cache file is recomputed and replaced.
    """
    name = f"{dataset.info.name}/{dataset.split}"
    data_hash = hashlib.sha256(dataset.images.numpy().tobytes()).hexdigest()
    path = Path(cache_dir or stats_cache_dir()) / (
        f"{safe_name(dataset.info.name)}-{dataset.split}-{extractor.weights_sha256[:16]}-{data_hash[:16]}.npz"
    )
    try:
        with np.load(path) as stored:
            return Reference(name, stored["features"], FeatureStats(stored["mean"], stored["cov"], int(stored["n"])))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        pass  # not cached yet (or damaged): compute it
    features = extractor(dataset.images)
    stats = FeatureStats.from_features(features)
    _write_file(path, lambda handle: np.savez(handle, features=features, mean=stats.mean, cov=stats.cov, n=stats.n))
    return Reference(name, features, stats)


def _write_file(path: Path, write: Callable[[Any], object]) -> None:
    """write(handle) to path atomically (checkpoint.py's temporary file and rename), so
    that a crash never leaves half a file that a later run would trust."""
    def write_temporary(temporary: Path) -> None:
        with temporary.open("wb") as handle:
            write(handle)

    write_atomically(path, write_temporary)


# --- FID of generated images ---------------------------------------------------------------------

def compare(reference: Reference, features: np.ndarray, k: int = PRECISION_RECALL_K) -> dict[str, float]:
    """FID, precision and recall of ``features`` against a reference split."""
    fake = FeatureStats.from_features(features)
    size = min(len(features), len(reference.features))
    precision, recall = precision_recall(_subset(reference.features, size), _subset(features, size), k)
    return {
        "fid": frechet_distance_from_stats(reference.stats.mean, reference.stats.cov, fake.mean, fake.cov),
        "precision": precision,
        "recall": recall,
    }


def _subset(features: np.ndarray, size: int) -> np.ndarray:
    if len(features) == size:
        return features
    chosen = np.random.default_rng(_SUBSET_SEED).permutation(len(features))[:size]
    return features[np.sort(chosen)]


def compute_fid(
    generate: Callable[[int], Iterable[torch.Tensor]],
    num: int,
    extractor: FeatureExtractor,
    references: Iterable[ImageDataset | Reference],
    *,
    settings: Mapping[str, Any],
    work_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    k: int = PRECISION_RECALL_K,
) -> dict[str, Any]:
    """FID, precision and recall of ``num`` generated images against each reference split.

    ``generate(start_batch)`` yields batches of samples in [-1, 1] from batch number
    ``start_batch`` on (e.g. ``lambda k: samplers.sample_batches(..., start_batch=k)``).
    ``references`` are dataset splits (their features come from the cache, see
    reference_features) or precomputed References.
    ``settings`` is everything that decides the images (checkpoint, EMA or raw weights,
    sampler, steps, seed, batch size, ...): it is copied into the result and, with a
    ``work_dir``, stored beside the features of every finished batch. Run again with
    the same work_dir and settings, it resumes at the first unfinished batch; with
    other settings it refuses rather than mix two experiments.

    The result: per split, "fid", "precision" and "recall"; and the provenance: number
    generated, reference images per split, extractor and its weights' SHA-256, k, settings.
    """
    if num < 2:
        raise ConfigError(f"FID needs at least 2 generated images, got {num}")
    references = [
        reference if isinstance(reference, Reference) else reference_features(reference, extractor, cache_dir=cache_dir)
        for reference in references
    ]
    # Through JSON and back, so that it compares equal with the stored copy (tuples become lists).
    fingerprint = json.loads(json.dumps({"num": num, **extractor.provenance(), "settings": dict(settings)}, default=str))
    features = _generated_features(generate, num, extractor, Path(work_dir) / "generated-features" if work_dir else None, fingerprint)
    return {
        "splits": {reference.name: compare(reference, features, k) for reference in references},
        "num_generated": num,
        "reference_images": {reference.name: reference.stats.n for reference in references},
        **extractor.provenance(),
        "feature_dim": int(features.shape[1]),
        "precision_recall_k": k,
        "settings": fingerprint["settings"],
    }


def _generated_features(
    generate: Callable[[int], Iterable[torch.Tensor]],
    num: int,
    extractor: FeatureExtractor,
    store: Path | None,
    fingerprint: dict[str, Any],
) -> np.ndarray:
    """Features of the generated images; with a store folder, one file per finished batch."""
    finished = _open_store(store, fingerprint) if store else []
    count = sum(len(batch) for batch in finished)
    if count < num:
        for samples in generate(len(finished)):
            batch = generated_features(extractor, samples)[: num - count]
            if store:
                _write_file(store / f"batch-{len(finished):06d}.npy", lambda handle: np.save(handle, batch))
            finished.append(batch)
            count += len(batch)
            if count >= num:
                break
    if count < num:
        raise DdpmError(f"the sample generator stopped after {count} of {num} images")
    return np.concatenate(finished)[:num]


def _open_store(store: Path, fingerprint: dict[str, Any]) -> list[np.ndarray]:
    """The batches an earlier run with the same settings finished, in order; a new store
    gets the settings written first."""
    settings_file = store / "settings.json"
    if not settings_file.is_file():
        _write_file(settings_file, lambda handle: handle.write(json.dumps(fingerprint, indent=2).encode()))
        return []
    try:
        stored = json.loads(settings_file.read_text())
    except json.JSONDecodeError:
        stored = None
    if stored != fingerprint:
        raise ConfigError(
            f"{store} holds generated features of other settings (see {settings_file.name}); "
            "delete that folder or choose another output directory"
        )
    finished = []
    while (batch_file := store / f"batch-{len(finished):06d}.npy").is_file():
        try:
            finished.append(np.load(batch_file))
        except (OSError, ValueError):
            break  # written atomically, so only a damaged disk gets here: redo from this batch
    return finished


def model_fid(
    trained: TrainedModel,
    extractor: FeatureExtractor,
    *,
    num: int,
    against: Sequence[Split] = ("train", "test"),
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
    work_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    floor: bool = False,
    **sample_kwargs: Any,
) -> dict[str, Any]:
    """What ``ddpm fid`` computes: compute_fid of ``num`` samples of a trained model against
    the splits ``against`` of the dataset it was trained on (as its config reads it); with
    ``floor``, also real_vs_real of its train split against its test split ("real_vs_real").

    ``sample_kwargs`` go to samplers.sample (sampler, steps, eta, variance, spacing, ...).
    The settings in the result name the checkpoint, its step, EMA or raw weights, the
    seed and batch size (batch k is drawn with seeded_generator(seed, k)) and the sampler
    options with their defaults filled in (steps None = all num_steps). ``work_dir`` makes
    the run resumable (compute_fid). "wall_seconds" is the time this call took.
    """
    started = time.perf_counter()
    if num < 2 or batch_size < 1:  # checked before any dataset is read
        raise ConfigError(f"need num >= 2 and batch_size >= 1, got {num} and {batch_size}")
    config = trained.config
    splits = {
        split: load_dataset(config.dataset, split, data_dir=config.data_dir, image_size=config.image_size, channels=config.channels, seed=config.seed)
        for split in dict.fromkeys([*against, *(("train", "test") if floor else ())])
    }
    steps = sample_kwargs.pop("steps", None)
    sample_kwargs = {"spacing": DEFAULT_SPACING, **sample_kwargs, "steps": trained.schedule.num_steps if steps is None else steps}
    num_batches = math.ceil(num / batch_size)

    def generate(start_batch: int) -> Iterable[torch.Tensor]:
        batches = sample_batches(
            trained.model, trained.schedule, num, batch_size, trained.image_shape, seed=seed, start_batch=start_batch, device=device, **sample_kwargs
        )
        return tqdm(batches, total=num_batches, initial=start_batch, unit="batch", desc="sampling", disable=not progress)

    settings = {
        "checkpoint": str(trained.path.resolve()), "step": trained.step, "weights": "EMA" if trained.ema else "raw",
        "seed": seed, "batch_size": batch_size, **sample_kwargs,
    }
    result = compute_fid(generate, num, extractor, [splits[split] for split in against], settings=settings, work_dir=work_dir, cache_dir=cache_dir)
    if floor:
        result["real_vs_real"] = real_vs_real(splits["train"], splits["test"], extractor, cache_dir=cache_dir)
    return {**result, "device": str(device), "wall_seconds": round(time.perf_counter() - started, 1)}


def real_vs_real(
    first: ImageDataset, second: ImageDataset, extractor: FeatureExtractor, *, cache_dir: str | Path | None = None, k: int = PRECISION_RECALL_K
) -> dict[str, Any]:
    """FID, precision and recall of one real split against another (train vs test): the
    floor a model's FID is compared against, since two samples of the same distribution
    differ too."""
    reference = reference_features(first, extractor, cache_dir=cache_dir)
    other = reference_features(second, extractor, cache_dir=cache_dir)
    return {
        "splits": {reference.name: compare(reference, other.features, k)},
        "compared": other.name,
        "reference_images": {reference.name: reference.stats.n, other.name: other.stats.n},
        **extractor.provenance(),
        "precision_recall_k": k,
    }


def minibatch_fid(
    model: Callable[..., torch.Tensor],
    schedule: NoiseSchedule,
    validation: ImageDataset,
    extractor: FeatureExtractor,
    *,
    num_images: int,
    batch_size: int,
    seed: int,
    **sample_kwargs: Any,
) -> float:
    """The poster's per-epoch FID: ``num_images`` samples (cheap sampler settings in
    sample_kwargs) against the first ``num_images`` validation images.

    The same validation images and seeds every epoch, so that the curve shows the model
    changing, not the sample. With few images the estimate is biased upwards (Chong &
    Forsyth 2020), so it is comparable across epochs, not with a full FID.
    """
    num_images = min(num_images, len(validation))
    real = extractor(validation.images[:num_images])
    image_shape = tuple(validation.images.shape[1:])
    fake = np.concatenate([
        generated_features(extractor, samples)
        for samples in sample_batches(model, schedule, num_images, batch_size, image_shape, seed=seed, **sample_kwargs)
    ])
    return frechet_distance(real, fake)


# --- the FID Inception-v3 network ------------------------------------------------------------------
#
# The Inception-v3 of TensorFlow's original FID code ("2015-12-05" graph), as ported to
# PyTorch by pytorch-fid (weights file pt_inception-2015-12-05-6726825d.pth). It is
# torchvision's Inception-v3 layout with 1008 classes and no auxiliary head, plus three
# differences of the TensorFlow graph: average pools ignore the zero padding
# (count_include_pad=False), and the last block pools with max instead of average.
# Module names match the file's state-dict keys, so it loads strictly.

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS_FILE
# torch.hub's convention: the file name carries the first hex digits of its SHA-256.
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_FEATURE_DIM = 2048
_INCEPTION_SIZE = 299


class _FrozenBatchNorm(nn.Module):
    """Batch norm with fixed statistics (the network is only ever evaluated).

    eps = 0.001 as in TensorFlow's Inception (and torchvision's port).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((channels,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=0.001)


class _BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm -> ReLU, torchvision's BasicConv2d."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride: int = 1, padding: int | tuple[int, int] = 0
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = _FrozenBatchNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_average_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _max_pool_same(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


class _InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = _BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = _BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = _BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_tf_average_pool(x)),
        ], dim=1)


class _InceptionB(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = _BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], dim=1)


class _InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = _BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = _BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = _BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(_tf_average_pool(x)),
        ], dim=1)


class _InceptionD(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = _BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = _BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = _BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2)], dim=1)


class _InceptionE(nn.Module):
    def __init__(self, in_channels: int, pool: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = _BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = _BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = _BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = _BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(self.pool(x)),
        ], dim=1)


class FIDInceptionV3(nn.Module):
    """Images in [-1, 1] (B, 1 or 3, H, W) -> the 2048 pool3 features of FID.

    As pytorch-fid: resized to 299 x 299 bilinearly (align_corners=False, no
    antialiasing); grayscale is repeated to three channels. pytorch-fid resizes images
    in [0, 1] and then maps them to [-1, 1]; bilinear interpolation commutes with that
    affine map, so resizing the [-1, 1] image is the same up to float rounding.
    ``fc`` (the 1008 logits) is not used for the features; it is kept so the weights
    file loads with every key checked.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = _BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = _BasicConv2d(80, 192, 3)
        self.Mixed_5b = _InceptionA(192, pool_features=32)
        self.Mixed_5c = _InceptionA(256, pool_features=64)
        self.Mixed_5d = _InceptionA(288, pool_features=64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b = _InceptionC(768, channels_7x7=128)
        self.Mixed_6c = _InceptionC(768, channels_7x7=160)
        self.Mixed_6d = _InceptionC(768, channels_7x7=160)
        self.Mixed_6e = _InceptionC(768, channels_7x7=192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b = _InceptionE(1280, pool=_tf_average_pool)
        self.Mixed_7c = _InceptionE(2048, pool=_max_pool_same)  # max pool: the TF graph's quirk
        self.fc = nn.Linear(INCEPTION_FEATURE_DIM, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(_INCEPTION_SIZE, _INCEPTION_SIZE), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))  # pool3: global average pooling


def inception_weights_path(path: str | Path | None = None) -> Path:
    """The FID Inception weights file: ``path``, else ``<cache>/inception/``, else torch.hub's
    checkpoint folder (where pytorch-fid keeps it), else downloaded into ``<cache>/inception/``."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DdpmError(f"Inception weights file {path} does not exist")
        return path
    folder = cache_root() / "inception"
    for candidate in (folder / INCEPTION_WEIGHTS_FILE, Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE):
        if candidate.is_file():
            return candidate
    try:
        import pooch  # only when a download is needed (data.py's _fetch says why)

        # No known_hash: the SHA-256 prefix is checked by load_inception like any found file.
        return Path(pooch.retrieve(INCEPTION_WEIGHTS_URL, known_hash=None, fname=INCEPTION_WEIGHTS_FILE, path=folder))
    except (ImportError, OSError, ValueError) as exc:
        reason = f"{exc.name} is not installed" if isinstance(exc, ImportError) else type(exc).__name__
        raise DdpmError(
            f"the FID Inception weights are not here and could not be downloaded ({reason}); "
            f"put {INCEPTION_WEIGHTS_FILE} (from {INCEPTION_WEIGHTS_URL}) into {folder}"
        ) from None


def load_inception(path: str | Path | None = None, *, device: str | torch.device = "cpu") -> tuple[FIDInceptionV3, str]:
    """The FID Inception network with its weights, in eval mode, and the weights file's SHA-256."""
    path = inception_weights_path(path)
    sha256 = file_sha256(path)
    if not sha256.startswith(INCEPTION_SHA256_PREFIX):
        raise CheckpointError(f"{path} is not the FID Inception weights file (its SHA-256 does not start with {INCEPTION_SHA256_PREFIX})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (pickle, zip, runtime) on a damaged file
        raise CheckpointError(f"{path} is not a readable torch weights file ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    # torchvision's batch norms also store a training-step counter, meaningless here.
    state = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
    network = FIDInceptionV3()
    load_weights(network, state, source=str(path))
    return network.to(device).eval(), sha256


def inception_extractor(path: str | Path | None = None, *, device: str | torch.device = "cpu") -> FeatureExtractor:
    network, sha256 = load_inception(path, device=device)
    return FeatureExtractor(name="inception-v3-fid", weights_sha256=sha256, network=network, device=torch.device(device), batch_size=50)
