"""The guidance sweep, end to end on the analytic two-class mixture of test_guidance.py.

Its exact noise predictors and posteriors stand in for the trained model, the guiding
classifier and the judge, and a 4-pixel image is its own feature vector, so a sweep takes
well under a second; the stand-ins know the truth, so the curve's direction is checked.
"""

import json

import numpy as np
import pytest
import torch
from test_guidance import SCHEDULE, MixtureClassifier, MixtureModel, UnconditionalMixtureModel

from ddpmkit import ConfigError
from ddpmkit.images import to_uint8
from ddpmkit.fid import FeatureExtractor, Reference, compare
from ddpmkit.metrics import FeatureStats
from ddpmkit.sweeps import guidance_sweep, plot_guidance_sweep, write_guidance_sweep

IMAGE_SHAPE = (1, 2, 2)
PIXELS = FeatureExtractor(name="pixels", weights_sha256="0" * 64, network=lambda x: x.flatten(1), device=torch.device("cpu"))


def mixture_reference():
    """400 real images per class of the mixture, drawn exactly, as a test split's features."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(800) % 2
    x0 = 0.3 * (2 * labels - 1).view(-1, 1, 1, 1) + 0.5 * torch.randn(800, *IMAGE_SHAPE, generator=generator)
    features = PIXELS(to_uint8(x0))
    return Reference("mixture/test", features, FeatureStats.from_features(features))


REFERENCE = mixture_reference()
COMMON = dict(classes=[0, 1], per_class=100, judge=MixtureClassifier(), extractor=PIXELS, reference=REFERENCE,
              seed=3, batch_size=64, sampler="dpm-solver++", steps=20)


def test_classifier_guidance_sweep_trades_diversity_for_accuracy(tmp_path):
    scales = [0.0, 1.0, 6.0]
    results = guidance_sweep(UnconditionalMixtureModel(SCHEDULE), SCHEDULE, IMAGE_SHAPE, kind="classifier",
                             scales=scales, guide_classifier=MixtureClassifier(SCHEDULE), **COMMON)
    assert [row["scale"] for row in results] == scales
    assert all(set(row) == {"scale", "accuracy", "fid", "precision", "recall", "num"} for row in results)
    assert all(row["num"] == 200 and 0 <= row["accuracy"] <= 1 for row in results)
    accuracy, fid, recall = ([row[key] for row in results] for key in ("accuracy", "fid", "recall"))
    # Unguided, the classes are drawn at random: about half are what was asked for. At s = 1
    # the exact classifier makes the samples the conditional distribution (test_guidance), so
    # accuracy is the Bayes accuracy (0.885 for these classes) and the sample is still the
    # test set's distribution; s = 6 overshoots: more accurate, less diverse.
    assert abs(accuracy[0] - 0.5) < 0.1 and abs(accuracy[1] - 0.885) < 0.06 and accuracy[2] > accuracy[1]
    assert fid[2] > 5 * max(fid[0], fid[1]) and recall[2] < recall[0]

    json_path = write_guidance_sweep(results, tmp_path / "out" / "sweep.json", settings={"kind": "classifier", "seed": 3})
    assert json.loads(json_path.read_text()) == {"settings": {"kind": "classifier", "seed": 3}, "results": results}
    png = plot_guidance_sweep(results, tmp_path / "out" / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_classifier_free_sweep_and_what_a_row_measures():
    model = MixtureModel(SCHEDULE)
    results = guidance_sweep(model, SCHEDULE, IMAGE_SHAPE, kind="classifier-free", scales=[0.0, 3.0], **COMMON)
    # w = 0 is exact conditional sampling; w = 3 sharpens the classes.
    assert abs(results[0]["accuracy"] - 0.885) < 0.06 and results[1]["accuracy"] > results[0]["accuracy"]
    # A row is the samples a direct call would make, scored by the judge and evaluation.compare.
    from ddpmkit.samplers import sample_batches

    labels = torch.tensor([0, 1]).repeat_interleave(100)
    samples = torch.cat(list(sample_batches(model, SCHEDULE, 200, 64, IMAGE_SHAPE, seed=3, labels=labels,
                                            guidance_scale=3.0, sampler="dpm-solver++", steps=20)))
    images = to_uint8(samples)
    predicted = MixtureClassifier()(images.float() / 127.5 - 1).argmax(dim=1)
    assert results[1]["accuracy"] == pytest.approx((predicted == labels).double().mean().item())
    expected = compare(REFERENCE, PIXELS(images))
    assert {key: results[1][key] for key in expected} == pytest.approx(expected)


@pytest.mark.parametrize("changes, message", [
    ({"kind": "clip"}, "kind"),
    ({"kind": "classifier"}, "guide_classifier"),
    ({"kind": "classifier-free", "guide_classifier": MixtureClassifier(SCHEDULE)}, "guide_classifier"),
    ({"scales": []}, "scale"),
    ({"classes": []}, "class"),
    ({"per_class": 0}, "per_class"),
])
def test_invalid_sweeps_raise_config_error(changes, message):
    arguments = {**COMMON, "kind": "classifier-free", "scales": [0.0], **changes}
    with pytest.raises(ConfigError, match=message):
        guidance_sweep(MixtureModel(SCHEDULE), SCHEDULE, IMAGE_SHAPE, **arguments)
