"""The FID pipeline: feature networks, cached reference features, and resumable FID of a model's samples.

Feature spaces (``FeatureExtractor``): the penultimate layer of a small classifier
trained on the dataset (classifier.py; the poster's choice for 28x28 grayscale data) or
the standard FID Inception-v3 pool3 features (inception.py). Every result names the
extractor and the SHA-256 of its weights file: FIDs on different feature spaces are not
comparable. The metrics themselves are metrics.py's.

Images enter an extractor as uint8, so generated samples (floats in [-1, 1]) are
quantised exactly as a saved PNG would be, and compared with real images on equal terms.

Reference features of a dataset split are cached in ``<cache>/stats/`` (io.cache_root)
and reused. ``compute_fid`` can keep the features of finished generated batches in a
work directory and resume from the first unfinished batch; ``model_fid`` is what
``ddpm fid`` and the ablation compute for a trained model.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .checkpoint import TrainedModel
from .choices import FEATURE_KINDS, FeatureKind, Split
from .classifier import find_classifier, load_classifier
from .config import model_output_options
from .data import ImageDataset, load_dataset
from .errors import ConfigError, DdpmError
from .images import to_model_range, to_uint8
from .inception import load_inception
from .io import cache_root, file_sha256, safe_name, write_atomically
from .metrics import PRECISION_RECALL_K, FeatureStats, frechet_distance, frechet_distance_from_stats, precision_recall
from .samplers import sample, sample_batches, step_progress
from .schedules import NoiseSchedule
from .validation import check_choice

# Both sets are cut to the same size for precision/recall (the k-NN radii shrink as a set
# grows, so unequal sizes would bias the two numbers); the cut is a fixed random subset.
_SUBSET_SEED = 0
# The options of samplers.sample that decide the samples besides the model, seed and labels.
_SAMPLER_OPTIONS = ("sampler", "steps", "eta", "variance", "prediction", "spacing", "clip_denoised")


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
    check_choice("feature extractor", kind, FEATURE_KINDS)
    if kind == "classifier":
        return classifier_extractor(path or find_classifier(dataset), device=device)
    return inception_extractor(path, device=device)


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
    """write(handle) to path atomically (io.write_atomically), so that a crash never
    leaves half a file that a later run would trust."""
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
    ``work_dir``, the features of every finished batch are kept in
    ``work_dir/generated-features/<settings_digest of num, extractor and settings>/``, with
    those settings beside them. Run again with the same work_dir and settings, it resumes
    at the first unfinished batch; other settings get a folder of their own.

    The result: per split, "fid", "precision" and "recall"; and the provenance: number
    generated, reference images per split, extractor and its weights' SHA-256, k, settings;
    and "warnings" (small_sample_warnings), when there are any.
    """
    if num < 2:
        raise ConfigError(f"FID needs at least 2 generated images, got {num}")
    references = [
        reference if isinstance(reference, Reference) else reference_features(reference, extractor, cache_dir=cache_dir)
        for reference in references
    ]
    # Through JSON and back, so that it compares equal with the stored copy (tuples become lists).
    fingerprint = json.loads(json.dumps({"num": num, **extractor.provenance(), "settings": dict(settings)}, default=str))
    store = Path(work_dir) / "generated-features" / settings_digest(fingerprint) if work_dir else None
    features = _generated_features(generate, num, extractor, store, fingerprint)
    warnings = small_sample_warnings({"generated": num, **{r.name: r.stats.n for r in references}}, int(features.shape[1]), k)
    return {
        "splits": {reference.name: compare(reference, features, k) for reference in references},
        "num_generated": num,
        "reference_images": {reference.name: reference.stats.n for reference in references},
        **extractor.provenance(),
        "feature_dim": int(features.shape[1]),
        "precision_recall_k": k,
        "settings": fingerprint["settings"],
        **({"warnings": warnings} if warnings else {}),
    }


def small_sample_warnings(sizes: Mapping[str, int], feature_dim: int, k: int = PRECISION_RECALL_K) -> list[str]:
    """One warning per set of images (name: count) too small for FID in ``feature_dim``
    dimensions: n images have a covariance of rank at most n - 1, so with n <= feature_dim it
    is singular and the FID mostly the estimate's bias; precision and recall from the k
    nearest of so few neighbours are as unreliable."""
    return [
        f"{name}: {n} images in a {feature_dim}-dimensional feature space, whose covariance has rank at most {n - 1}: "
        f"FID is mostly estimation bias, and precision/recall (k = {k} neighbours) unreliable; use more than {feature_dim} images"
        for name, n in sizes.items() if n <= feature_dim
    ]


def _generated_features(
    generate: Callable[[int], Iterable[torch.Tensor]],
    num: int,
    extractor: FeatureExtractor,
    store: Path | None,
    fingerprint: dict[str, Any],
) -> np.ndarray:
    """Features of the generated images; with a store folder, one file per finished batch."""
    finished = open_batch_store(store, fingerprint, what="generated features") if store else []
    count = sum(len(batch) for batch in finished)
    if count < num:
        for samples in generate(len(finished)):
            batch = generated_features(extractor, samples)[: num - count]
            if store:
                write_batch(store, len(finished), batch)
            finished.append(batch)
            count += len(batch)
            if count >= num:
                break
    if count < num:
        raise DdpmError(f"the sample generator stopped after {count} of {num} images")
    return np.concatenate(finished)[:num]


def write_batch(store: Path, index: int, batch: np.ndarray) -> None:
    """Keep finished batch number ``index`` in ``store`` (atomically), for open_batch_store."""
    _write_file(store / f"batch-{index:06d}.npy", lambda handle: np.save(handle, batch))


def open_batch_store(store: Path, fingerprint: dict[str, Any], *, what: str) -> list[np.ndarray]:
    """The batches (``batch-NNNNNN.npy``) an earlier run with the same settings finished, in
    order; a new store gets the settings written first. ``what`` names the batches' contents
    in the refusal of a store of other settings."""
    settings_file = store / "settings.json"
    if not settings_file.is_file():
        _write_file(settings_file, lambda handle: handle.write(json.dumps(fingerprint, indent=2).encode()))
        return []
    try:
        stored = json.loads(settings_file.read_text())
    except json.JSONDecodeError:
        stored = None
    if stored != fingerprint:  # a damaged settings.json, or a folder copied here by hand
        raise ConfigError(
            f"{store} holds {what} of other settings (see {settings_file.name}); "
            "delete that folder"
        )
    finished = []
    while (batch_file := store / f"batch-{len(finished):06d}.npy").is_file():
        try:
            finished.append(np.load(batch_file))
        except (OSError, ValueError):
            break  # written atomically, so only a damaged disk gets here: redo from this batch
    return finished


def sampler_settings(trained: TrainedModel, **sample_kwargs: Any) -> dict[str, Any]:
    """The sampler options that decide the samples, typed, with sample's defaults filled in
    (steps: all num_steps), how the model's output is read (config.model_output_options: its
    prediction target, and variance None = the model's own), and only the options the sampler
    uses: eta for ddim, the variance for ddpm (or a learned one, which every sampler reads)."""
    defaults = {name: parameter.default for name, parameter in inspect.signature(sample).parameters.items() if name in _SAMPLER_OPTIONS}
    output = model_output_options(trained.config, sample_kwargs.pop("variance", None))
    settings = {**defaults, **sample_kwargs, **output}
    if settings["steps"] is None:
        settings["steps"] = trained.schedule.num_steps
    if settings["sampler"] != "ddim":
        del settings["eta"]
    if settings["sampler"] != "ddpm" and settings["variance"] != "learned":
        del settings["variance"]
    return settings


def fid_settings(trained: TrainedModel, *, seed: int, batch_size: int, **sample_kwargs: Any) -> dict[str, Any]:
    """Everything that decides a trained model's samples, the record that every result of
    them carries (``ddpm sample``, ``ddpm fid``, guidance sweeps, the ablation): the checkpoint
    (absolute path and SHA-256 of the file), its step, EMA or raw weights, the seed and batch
    size (batch k is drawn with seeded_generator(seed, k)), sampler_settings and the ddpmkit
    version that sampled."""
    return {
        "checkpoint": str(trained.path.resolve()), "checkpoint_sha256": file_sha256(trained.path), "step": trained.step,
        "weights": "EMA" if trained.ema else "raw", "seed": seed, "batch_size": batch_size,
        **sampler_settings(trained, **sample_kwargs), "ddpmkit_version": __version__,
    }


def settings_digest(settings: Mapping[str, Any]) -> str:
    """A short hash naming a work folder of one set of settings (the ablation's RUN/fid/<digest>/,
    compute_fid's generated-features/<digest>/)."""
    return hashlib.sha256(json.dumps(dict(settings), sort_keys=True, default=str).encode()).hexdigest()[:12]


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
    description: str = "sampling",
    floor: bool = False,
    **sample_kwargs: Any,
) -> dict[str, Any]:
    """What ``ddpm fid`` computes: compute_fid of ``num`` samples of a trained model against
    the splits ``against`` of the dataset it was trained on (as its config reads it); with
    ``floor``, also real_vs_real of its train split against its test split ("real_vs_real").

    ``sample_kwargs`` go to samplers.sample (sampler, steps, eta, variance, spacing, ...).
    The settings in the result are fid_settings'. ``work_dir`` makes the run resumable
    (compute_fid); ``description`` labels the progress bar, which counts sampler steps.
    "wall_seconds" is the time this call took.
    """
    started = time.perf_counter()
    if num < 2 or batch_size < 1:  # checked before any dataset is read
        raise ConfigError(f"need num >= 2 and batch_size >= 1, got {num} and {batch_size}")
    config = trained.config
    splits = {
        split: load_dataset(config.dataset, split, data_dir=config.data_dir, image_size=config.image_size, channels=config.channels, seed=config.seed)
        for split in dict.fromkeys([*against, *(("train", "test") if floor else ())])
    }
    sampling = sampler_settings(trained, **sample_kwargs)
    settings = fid_settings(trained, seed=seed, batch_size=batch_size, **sample_kwargs)
    num_batches = math.ceil(num / batch_size)

    def generate(start_batch: int) -> Iterator[torch.Tensor]:
        with step_progress(num_batches, sampling["steps"], description=description, start_batch=start_batch, disable=not progress) as advance:
            yield from sample_batches(
                trained.model, trained.schedule, num, batch_size, trained.image_shape, seed=seed, start_batch=start_batch,
                device=device, callback=advance, **sampling,
            )

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
    labelled: bool = False,
    **sample_kwargs: Any,
) -> float:
    """The poster's per-epoch FID: ``num_images`` samples (cheap sampler settings in
    sample_kwargs) against ``num_images`` validation images, a fixed class-balanced subset
    (class_balanced_indices), since a split may be ordered by class (folder: datasets are).
    With ``labelled`` (a conditional model) each sample is drawn with its reference image's label.

    The same validation images and seeds every epoch, so that the curve shows the model
    changing, not the sample. With few images the estimate is biased upwards (Chong &
    Forsyth 2020), so it is comparable across epochs, not with a full FID.
    """
    chosen = class_balanced_indices(validation.labels, min(num_images, len(validation)))
    real = extractor(validation.images[chosen])
    image_shape = tuple(validation.images.shape[1:])
    labels = validation.labels[chosen] if labelled else None
    fake = np.concatenate([
        generated_features(extractor, samples)
        for samples in sample_batches(model, schedule, len(chosen), batch_size, image_shape, seed=seed, labels=labels, **sample_kwargs)
    ])
    return frechet_distance(real, fake)


def class_balanced_indices(labels: torch.Tensor, size: int) -> torch.Tensor:
    """The sorted indices of ``size`` images, each class as often as the labels allow: a
    fixed random subset (seeded by _SUBSET_SEED) that takes the k-th image of every class
    before any class's (k+1)-th, the classes in a random order for the last, partial round."""
    labels = np.asarray(labels)
    generator = np.random.default_rng(_SUBSET_SEED)
    ranked = []  # (rank within its class, the class's place in the order, index)
    for place, label in enumerate(generator.permutation(np.unique(labels))):
        members = generator.permutation(np.flatnonzero(labels == label))
        ranked += [(rank, place, int(index)) for rank, index in enumerate(members)]
    return torch.tensor(sorted(index for _, _, index in sorted(ranked)[:size]), dtype=torch.int64)


def inception_extractor(path: str | Path | None = None, *, device: str | torch.device = "cpu") -> FeatureExtractor:
    network, sha256 = load_inception(path, device=device)
    return FeatureExtractor(name="inception-v3-fid", weights_sha256=sha256, network=network, device=torch.device(device), batch_size=50)
