"""The guidance trade-off: class accuracy, FID, precision and recall against the guidance scale.

Raising the scale of classifier guidance (Dhariwal & Nichol 2021, section 4.3) or of
classifier-free guidance (Ho & Salimans 2022, section 4) makes samples more clearly of
their class (precision and a judge classifier's accuracy go up) at the cost of diversity
(recall goes down; FID, which rewards both, is typically best at a small scale and
grows beyond it). ``guidance_sweep`` measures this curve: for each scale it generates
``per_class`` samples of each class, with the same seed at every scale (so the scales
differ in guidance only, not in the initial noise), and scores them:

* accuracy: the fraction a *judge*, a classifier of clean images (e.g. the FID
  classifier of classifier.py), assigns to the class that was asked for;
* FID, precision and recall against reference features (evaluation.py's ``compare``).

Samples are quantised to uint8 first, for the judge as for the FID features, so that
both score the images a user would save.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from .data import to_model_range, to_uint8
from .errors import ConfigError
from .evaluation import FeatureExtractor, Reference, compare
from .guidance import DEFAULT_GUIDANCE_FORM, GuidanceForm
from .samplers import SamplerName, sample_batches
from .schedules import NoiseSchedule

SweepKind = Literal["classifier-free", "classifier"]
SWEEP_KINDS: tuple[str, ...] = get_args(SweepKind)


def guidance_sweep(
    model: Callable[..., torch.Tensor],
    schedule: NoiseSchedule,
    image_shape: tuple[int, ...],
    *,
    kind: SweepKind,
    scales: Sequence[float],
    classes: Sequence[int],
    per_class: int,
    judge: Callable[[torch.Tensor], torch.Tensor],
    extractor: FeatureExtractor,
    reference: Reference,
    seed: int,
    batch_size: int,
    sampler: SamplerName = "ddim",
    steps: int | None = None,
    guide_classifier: Callable[..., torch.Tensor] | None = None,
    guidance_form: GuidanceForm = DEFAULT_GUIDANCE_FORM,
    **sample_kwargs: Any,
) -> list[dict[str, float | int]]:
    """One row {scale, accuracy, fid, precision, recall, num} per guidance scale.

    ``kind`` "classifier-free": ``scales`` are w of guidance.py (``model`` conditional);
    "classifier": they are the classifier scale s, ``guide_classifier`` guiding in
    ``guidance_form``. ``judge(images)`` gives logits of images in [-1, 1] on the model's
    device; ``reference`` holds real features from ``extractor`` (evaluation.py's
    reference_features). ``sample_kwargs`` (eta, variance, spacing, ...) go to ``sample``.
    """
    if kind not in SWEEP_KINDS:
        raise ConfigError(f"unknown sweep kind {kind!r}; choose one of {', '.join(SWEEP_KINDS)}")
    if (kind == "classifier") != (guide_classifier is not None):
        raise ConfigError("a guide_classifier is needed for kind 'classifier', and only there")
    if not scales or not classes or per_class < 1:
        raise ConfigError(f"need at least one scale and one class, and per_class >= 1, got {per_class}")
    labels = torch.tensor(list(classes), dtype=torch.int64).repeat_interleave(per_class)
    results = []
    for scale in scales:
        if kind == "classifier-free":
            guidance: dict[str, Any] = {"guidance_scale": scale}
        else:
            guidance = {"classifier": guide_classifier, "classifier_scale": scale, "guidance_form": guidance_form}
        batches = sample_batches(
            model, schedule, len(labels), batch_size, image_shape, seed=seed, labels=labels,
            sampler=sampler, steps=steps, **guidance, **sample_kwargs,
        )
        features, predictions = _score(batches, judge, extractor)
        results.append({
            "scale": float(scale),
            "accuracy": float((predictions == labels).double().mean()),
            **compare(reference, features),
            "num": len(labels),
        })
    return results


def _score(
    batches: Iterable[torch.Tensor], judge: Callable[[torch.Tensor], torch.Tensor], extractor: FeatureExtractor
) -> tuple[np.ndarray, torch.Tensor]:
    """The extractor's features and the judge's predicted classes of all samples."""
    features, predictions = [], []
    for samples in batches:
        images = to_uint8(samples)
        features.append(extractor(images.cpu()))
        with torch.inference_mode():
            predictions.append(judge(to_model_range(images)).argmax(dim=1).cpu())
    return np.concatenate(features), torch.cat(predictions)


def write_guidance_sweep(results: list[dict[str, float | int]], path: str | Path, *, settings: Mapping[str, Any]) -> Path:
    """``{"settings": ..., "results": [...]}`` as JSON: the rows and what produced them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": dict(settings), "results": results}, indent=2, default=str) + "\n")
    return path


def plot_guidance_sweep(results: list[dict[str, float | int]], path: str | Path) -> Path:
    """One figure, two panels against the scale: accuracy (with precision and recall), and FID."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [row["scale"] for row in results]
    figure, (fidelity_axis, fid_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("accuracy", "precision", "recall"):
        fidelity_axis.plot(scales, [row[key] for row in results], marker="o", label=key)
    fidelity_axis.set_ylim(0, 1.02)
    fidelity_axis.set_title("class accuracy (judge), precision, recall")
    fidelity_axis.legend()
    fid_axis.plot(scales, [row["fid"] for row in results], marker="o", color="tab:red")
    fid_axis.set_title("FID")
    for axis in (fidelity_axis, fid_axis):
        axis.set_xlabel("guidance scale")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
