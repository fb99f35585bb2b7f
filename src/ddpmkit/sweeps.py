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
the dataset's cached clean classifier, the reference its test split; besides the table and
its plot it draws one row of samples per scale (the same noise in every row).

The judge and FID's features must be independent of the guide: a guide judged by itself
scores the very inputs it pushed (adversarially) towards its class. So the poster form
guides with another network by default (role "guide" of classifier.py, another seed), and
a sweep whose guiding classifier has the judge's or the feature network's weights is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .checkpoint import load_trained_model
from .choices import DEFAULT_GUIDANCE_FORM, SWEEP_KINDS, FeatureKind, GuidanceForm, SamplerName, SweepKind
from .classifier import classifier_provenance, find_classifier, load_classifier, load_guiding_classifier
from .config import model_output_options
from .data import load_dataset
from .errors import ConfigError
from .fid import FeatureExtractor, Reference, compare, fid_settings, load_extractor, reference_features, small_sample_warnings
from .figures import save_strips
from .guidance import check_classifier_free, class_labels, num_guided_classes, resolve_classes
from .images import png_text, to_model_range, to_uint8
from .io import write_json
from .samplers import sample_batches, step_progress
from .schedules import NoiseSchedule
from .validation import check_choice

# Images in each row of the samples grid: about what stays readable at the figure's width.
GRID_ROW_IMAGES = 20


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
    on_samples: Callable[[float, torch.Tensor], Any] | None = None,
    **sample_kwargs: Any,
) -> list[dict[str, float | int]]:
    """One row {scale, accuracy, fid, precision, recall, num} per guidance scale.

    ``kind`` "classifier-free": ``scales`` are w of guidance.py (``model`` conditional);
    "classifier": they are the classifier scale s, ``guide_classifier`` guiding in
    ``guidance_form``. ``judge(images)`` gives logits of images in [-1, 1] on the model's
    device; ``reference`` holds real features from ``extractor`` (fid.py's
    reference_features). ``sample_kwargs`` (eta, variance, spacing, ...) go to ``sample``;
    ``progress`` shows a bar over the sampler steps of all scales; ``on_samples(scale,
    images)`` is given each scale's samples (uint8, in the order of class_labels).
    """
    check_choice("sweep kind", kind, SWEEP_KINDS)
    if (kind == "classifier") != (guide_classifier is not None):
        raise ConfigError("a guide_classifier is needed for kind 'classifier', and only there")
    if not scales or not classes or per_class < 1:
        raise ConfigError(f"need at least one scale and one class, and per_class >= 1, got {per_class}")
    labels = class_labels(classes, per_class)
    results = []
    num_batches = -(-len(labels) // batch_size)
    names = [f"scale {scale:g}, batch {k + 1}/{num_batches}" for scale in scales for k in range(num_batches)]
    with step_progress(len(names), steps or schedule.num_steps, description=kind, disable=not progress, batch_labels=names) as advance:
        for scale in scales:
            if kind == "classifier-free":
                guidance: dict[str, Any] = {"guidance_scale": scale}
            else:
                guidance = {"classifier": guide_classifier, "classifier_scale": scale, "guidance_form": guidance_form}
            batches = sample_batches(
                model, schedule, len(labels), batch_size, image_shape, seed=seed, labels=labels,
                sampler=sampler, steps=steps, callback=advance, **guidance, **sample_kwargs,
            )
            images, features, predictions = _score(batches, judge, extractor)
            if on_samples is not None:
                on_samples(float(scale), images)
            results.append({
                "scale": float(scale),
                "accuracy": float((predictions == labels).double().mean()),
                **compare(reference, features),
                "num": len(labels),
            })
    return results


def _score(
    batches: Iterable[torch.Tensor], judge: Callable[[torch.Tensor], torch.Tensor], extractor: FeatureExtractor,
) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """The samples as uint8 (on the CPU), the extractor's features and the judge's predicted classes."""
    kept, features, predictions = [], [], []
    for samples in batches:
        images = to_uint8(samples)
        kept.append(images.cpu())
        features.append(extractor(images.cpu()))
        with torch.inference_mode():
            predictions.append(judge(to_model_range(images)).argmax(dim=1).cpu())
    return torch.cat(kept), np.concatenate(features), torch.cat(predictions)


@dataclass(frozen=True)
class SweepOutput:
    """What sweep_run wrote: the rows, the JSON table, the plot and the samples grid,
    fid.small_sample_warnings of the sample sizes, and the settings."""

    results: list[dict[str, float | int]]
    table: Path
    plot: Path
    grid: Path
    warnings: list[str]
    settings: dict[str, Any]  # what made the results (also in the table), which network judged and which guided


def sweep_outputs(out_dir: str | Path) -> tuple[Path, Path, Path]:
    """The files sweep_run writes into out_dir: the table, its plot, the samples grid."""
    out_dir = Path(out_dir)
    return out_dir / "guidance-sweep.json", out_dir / "guidance-sweep.png", out_dir / "guidance-samples.png"


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
    progress: bool = True,
    **sample_kwargs: Any,
) -> SweepOutput:
    """What ``ddpm guidance-sweep RUN`` does: ``guidance_sweep`` on a trained run, judged by
    the dataset's cached clean classifier, against the features of its test split; writes
    the files of sweep_outputs into ``out_dir``: the table with every setting that made it
    (fid.fid_settings, the classifiers' paths and hashes), its plot, and a grid of one row
    per scale.

    The guiding classifier (kind "classifier") is ``guide_classifier_path`` or the dataset's
    cached one (classifier.load_guiding_classifier); one with the judge's or the FID feature
    network's weights is refused (module docstring). ``features`` picks the FID feature space
    (fid.load_extractor); ``sample_kwargs`` (sampler, steps, eta, ...) go to ``sample``;
    ``compile`` and ``cpu_workers`` to load_trained_model.
    """
    trained = load_trained_model(run, ema=ema, device=device, compile=compile, cpu_workers=cpu_workers)
    config = trained.config
    sample_kwargs = {**sample_kwargs, **model_output_options(config, sample_kwargs.pop("variance", None))}
    guide = guide_path = None
    if kind == "classifier":
        guide, guide_path, guide_meta = load_guiding_classifier(
            config.dataset, guidance_form, guide_classifier_path, schedule=trained.schedule, device=device
        )
    else:
        check_classifier_free(trained.model, max(scales, default=0.0), config.label_dropout)
    classes = resolve_classes(classes, num_guided_classes(trained.model, guide))
    judge_path = find_classifier(config.dataset)
    judge, judge_meta = load_classifier(judge_path, device=device)
    extractor = load_extractor(features, config.dataset, device=device)
    if guide is not None and guide_meta["weights_sha256"] in (judge_meta["weights_sha256"], extractor.weights_sha256):
        raise ConfigError(
            f"the guiding classifier {guide_path} has the weights of the judge {judge_path} or of the FID features "
            f"(SHA-256 {guide_meta['weights_sha256'][:12]}): guided samples must not be scored by their own guide; "
            f"guide with another network, e.g. ddpm train-classifier --dataset {config.dataset} --guide"
        )
    test = load_dataset(config.dataset, "test", data_dir=config.data_dir, image_size=config.image_size,
                        channels=config.channels, seed=config.seed)
    reference = reference_features(test, extractor)
    shown = max(1, min(per_class, GRID_ROW_IMAGES // len(classes)))
    rows: list[torch.Tensor] = []

    def keep_for_grid(scale: float, images: torch.Tensor) -> None:
        rows.append(torch.cat([images[c * per_class : c * per_class + shown] for c in range(len(classes))]))

    results = guidance_sweep(
        trained.model, trained.schedule, trained.image_shape, kind=kind, scales=scales, classes=classes,
        per_class=per_class, judge=judge, extractor=extractor, reference=reference, seed=seed,
        batch_size=batch_size, guide_classifier=guide, guidance_form=guidance_form, progress=progress,
        on_samples=keep_for_grid, **sample_kwargs,
    )
    settings = {
        **fid_settings(trained, seed=seed, batch_size=batch_size, **sample_kwargs), "kind": kind, "scales": list(scales),
        "classes": classes, "per_class": per_class,
        **({"guidance_form": guidance_form, **classifier_provenance(guide_path, "guide_classifier")} if guide is not None else {}),
        **classifier_provenance(judge_path, "judge"),
        "reference": reference.name, "reference_images": len(reference.features), **extractor.provenance(),
    }
    warnings = small_sample_warnings({"samples of each scale": per_class * len(classes), reference.name: len(reference.features)},
                                     int(reference.features.shape[1]))
    table, plot, grid = sweep_outputs(out_dir)
    write_guidance_sweep(results, table, settings={**settings, **({"warnings": warnings} if warnings else {})})
    plot_guidance_sweep(results, plot, settings=settings)
    symbol = "w" if kind == "classifier-free" else "lambda"
    save_strips(
        to_model_range(torch.stack(rows)), [f"class {c}" for c in classes for _ in range(shown)],
        [f"{symbol} = {scale:g}" for scale in scales],
        f"{kind} guidance: {shown} sample{'s' if shown > 1 else ''} of each class per scale, the same noise in every row", grid, settings=settings,
    )
    return SweepOutput(results, table, plot, grid, warnings, settings)


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


def plot_guidance_sweep(results: list[dict[str, float | int]], path: str | Path, *, settings: Mapping[str, Any] | None = None) -> Path:
    """One figure, two panels against the scale: accuracy (with precision and recall), and FID;
    ``settings`` into the PNG's text chunk."""
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
    figure.savefig(path, dpi=120, metadata=png_text(settings) if settings is not None else None)
    plt.close(figure)
    return path
