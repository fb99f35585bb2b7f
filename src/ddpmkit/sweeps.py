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
* FID, precision and recall against reference features (fid.py's ``compare``).

Samples are quantised to uint8 first, for the judge as for the FID features, so that
both score the images a user would save.

``sweep_run`` does this for a trained run, as ``ddpm guidance-sweep`` does: the judge is
the dataset's cached clean classifier, the reference its test split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import load_trained_model
from .choices import DEFAULT_GUIDANCE_FORM, SWEEP_KINDS, FeatureKind, GuidanceForm, SamplerName, SweepKind
from .classifier import find_classifier, load_classifier, load_guiding_classifier
from .config import model_output_options
from .data import load_dataset
from .errors import ConfigError
from .fid import FeatureExtractor, Reference, compare, load_extractor, reference_features
from .guidance import check_classifier_free, class_labels, num_guided_classes, resolve_classes
from .images import to_model_range, to_uint8
from .io import write_json
from .samplers import sample_batches
from .schedules import NoiseSchedule
from .validation import check_choice


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
    progress: bool = True,
    **sample_kwargs: Any,
) -> list[dict[str, float | int]]:
    """One row {scale, accuracy, fid, precision, recall, num} per guidance scale.

    ``kind`` "classifier-free": ``scales`` are w of guidance.py (``model`` conditional);
    "classifier": they are the classifier scale s, ``guide_classifier`` guiding in
    ``guidance_form``. ``judge(images)`` gives logits of images in [-1, 1] on the model's
    device; ``reference`` holds real features from ``extractor`` (fid.py's
    reference_features). ``sample_kwargs`` (eta, variance, spacing, ...) go to ``sample``;
    ``progress`` shows a bar over all images of all scales.
    """
    check_choice("sweep kind", kind, SWEEP_KINDS)
    if (kind == "classifier") != (guide_classifier is not None):
        raise ConfigError("a guide_classifier is needed for kind 'classifier', and only there")
    if not scales or not classes or per_class < 1:
        raise ConfigError(f"need at least one scale and one class, and per_class >= 1, got {per_class}")
    labels = class_labels(classes, per_class)
    results = []
    bar = tqdm(total=len(scales) * len(labels), unit="img", desc=f"{kind} scale {scales[0]:g}", disable=not progress)
    for scale in scales:
        bar.set_description(f"{kind} scale {scale:g}")
        if kind == "classifier-free":
            guidance: dict[str, Any] = {"guidance_scale": scale}
        else:
            guidance = {"classifier": guide_classifier, "classifier_scale": scale, "guidance_form": guidance_form}
        batches = sample_batches(
            model, schedule, len(labels), batch_size, image_shape, seed=seed, labels=labels,
            sampler=sampler, steps=steps, **guidance, **sample_kwargs,
        )
        features, predictions = _score(batches, judge, extractor, on_batch=bar.update)
        results.append({
            "scale": float(scale),
            "accuracy": float((predictions == labels).double().mean()),
            **compare(reference, features),
            "num": len(labels),
        })
    bar.close()
    return results


def _score(
    batches: Iterable[torch.Tensor], judge: Callable[[torch.Tensor], torch.Tensor], extractor: FeatureExtractor,
    on_batch: Callable[[int], Any],
) -> tuple[np.ndarray, torch.Tensor]:
    """The extractor's features and the judge's predicted classes of all samples;
    ``on_batch(n)`` after each batch of n (the progress bar)."""
    features, predictions = [], []
    for samples in batches:
        on_batch(len(samples))
        images = to_uint8(samples)
        features.append(extractor(images.cpu()))
        with torch.inference_mode():
            predictions.append(judge(to_model_range(images)).argmax(dim=1).cpu())
    return np.concatenate(features), torch.cat(predictions)


def sweep_run(
    run: str | Path,
    out_dir: str | Path,
    *,
    kind: SweepKind,
    scales: Sequence[float],
    per_class: int,
    classes: Sequence[int] | Literal["all"] = "all",
    guide_classifier_path: str | Path | None = None,
    guidance_form: GuidanceForm = DEFAULT_GUIDANCE_FORM,
    features: FeatureKind = "classifier",
    ema: bool = True,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    compile: bool = False,
    cpu_workers: int = 0,
    **sample_kwargs: Any,
) -> tuple[list[dict[str, float | int]], Path, Path]:
    """What ``ddpm guidance-sweep RUN`` does: ``guidance_sweep`` on a trained run, judged by
    the dataset's cached clean classifier, against the features of its test split; writes
    ``guidance-sweep.json`` and ``guidance-sweep.png`` into ``out_dir``.

    Returns the rows and the two paths. The guiding classifier (kind "classifier") is
    ``guide_classifier_path`` or the dataset's cached one (guidance.load_guiding_classifier).
    ``features`` picks the FID feature space (fid.load_extractor); ``sample_kwargs``
    (sampler, steps, eta, ...) go to ``sample``; ``compile`` and ``cpu_workers`` to load_trained_model.
    """
    trained = load_trained_model(run, ema=ema, device=device, compile=compile, cpu_workers=cpu_workers)
    config = trained.config
    sample_kwargs = {**sample_kwargs, **model_output_options(config, sample_kwargs.pop("variance", None))}
    guide = guide_path = None
    if kind == "classifier":
        guide, guide_path = load_guiding_classifier(config.dataset, guidance_form, guide_classifier_path, device=device)
    else:
        check_classifier_free(trained.model, max(scales, default=0.0))
    classes = resolve_classes(classes, num_guided_classes(trained.model, guide))
    judge_path = find_classifier(config.dataset)
    judge, judge_meta = load_classifier(judge_path, device=device)
    extractor = load_extractor(features, config.dataset, device=device)
    test = load_dataset(config.dataset, "test", data_dir=config.data_dir, image_size=config.image_size,
                        channels=config.channels, seed=config.seed)
    reference = reference_features(test, extractor)
    results = guidance_sweep(
        trained.model, trained.schedule, trained.image_shape, kind=kind, scales=scales, classes=classes,
        per_class=per_class, judge=judge, extractor=extractor, reference=reference, seed=seed,
        batch_size=batch_size, guide_classifier=guide, guidance_form=guidance_form, **sample_kwargs,
    )
    settings = {
        "checkpoint": str(trained.path), "step": trained.step, "ema": trained.ema, "kind": kind,
        "classes": classes, "per_class": per_class, "seed": seed, **sample_kwargs,
        **({"guidance_form": guidance_form, "guide_classifier": str(guide_path)} if guide is not None else {}),
        "judge": str(judge_path), "judge_sha256": judge_meta["weights_sha256"],
        "reference": reference.name, "reference_images": len(reference.features), **extractor.provenance(),
    }
    out_dir = Path(out_dir)
    json_path = write_guidance_sweep(results, out_dir / "guidance-sweep.json", settings=settings)
    return results, json_path, plot_guidance_sweep(results, out_dir / "guidance-sweep.png")


def format_sweep_table(results: list[dict[str, float | int]]) -> str:
    """The rows as a fixed-width text table, one line per scale."""
    lines = [f"{'scale':>7} {'accuracy':>9} {'FID':>9} {'precision':>10} {'recall':>7}"]
    lines += [
        f"{row['scale']:>7g} {row['accuracy']:>9.3f} {row['fid']:>9.3f} {row['precision']:>10.3f} {row['recall']:>7.3f}"
        for row in results
    ]
    return "\n".join(lines)


def write_guidance_sweep(results: list[dict[str, float | int]], path: str | Path, *, settings: Mapping[str, Any]) -> Path:
    """``{"settings": ..., "results": [...]}`` as JSON: the rows and what produced them."""
    return write_json(path, {"settings": dict(settings), "results": results}, what="guidance sweep")


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
