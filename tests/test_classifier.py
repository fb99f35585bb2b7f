"""The CNN classifier: shapes, time conditioning, training, files and the cache lookup."""

from __future__ import annotations

import json

import pooch
import pytest
import torch

from ddpmkit.classifier import (
    FEATURE_DIM,
    Classifier,
    ClassifierConfig,
    accuracy,
    classifier_cache_dir,
    classifier_dir_name,
    find_classifier,
    load_classifier,
    load_guiding_classifier,
    noisy_report_indices,
    save_classifier,
    train_classifier,
)
from ddpmkit.data import DatasetInfo, ImageDataset
from ddpmkit.errors import CheckpointError, ConfigError, DdpmError
from ddpmkit.samplers import sample
from ddpmkit.schedules import cosine_schedule, linear_schedule


def shapes_dataset(count: int, seed: int, split: str) -> ImageDataset:
    """8x8 grayscale images of three easy classes on a noisy background: a horizontal
    bar, a vertical bar, a 3x3 square, each at a random place."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 60, (count, 1, 8, 8), generator=generator, dtype=torch.uint8)
    labels = torch.arange(count) % 3
    where = torch.randint(1, 7, (count, 2), generator=generator)
    for image, label, (row, column) in zip(images, labels, where.tolist()):
        if label == 0:
            image[0, row, :] = 255
        elif label == 1:
            image[0, :, column] = 255
        else:
            image[0, row - 1 : row + 2, column - 1 : column + 2] = 255
    info = DatasetInfo(name="shapes", channels=1, image_size=8, num_classes=3, class_names=("row", "column", "square"))
    return ImageDataset(images=images, labels=labels, info=info, split=split)


@pytest.fixture(scope="module")
def trained():
    return train_classifier(shapes_dataset(300, 0, "train"), shapes_dataset(150, 1, "test"), epochs=3, batch_size=32, lr=3e-3, width=8, seed=0)


# --- the network -------------------------------------------------------------------------------

@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (1, 8)])
def test_logits_and_features_have_the_documented_shapes(channels, size):
    model = Classifier(channels, size, num_classes=10, width=8)
    x = torch.randn(2, channels, size, size)
    assert model(x).shape == (2, 10)
    features = model.features(x)
    assert features.shape == (2, FEATURE_DIM)
    assert torch.equal(model.head(features), model(x))  # features are the layer before the logits


def test_time_conditioned_classifier_depends_on_the_step_index():
    torch.manual_seed(0)
    model = Classifier(1, 8, num_classes=3, width=8, time_conditioned=True)
    x = torch.randn(4, 1, 8, 8)
    early, late = model(x, torch.zeros(4, dtype=torch.int64)), model(x, torch.full((4,), 900))
    assert not torch.allclose(early, late)
    assert torch.equal(model(x, torch.tensor(900)), late)  # a single index is broadcast
    with pytest.raises(ConfigError, match="needs the step index"):
        model(x)
    with pytest.raises(ConfigError, match="not time-conditioned"):
        Classifier(1, 8, num_classes=3, width=8)(x, torch.zeros(4, dtype=torch.int64))


def test_gradient_with_respect_to_the_input_exists_for_guidance():
    model = Classifier(1, 8, num_classes=3, width=8, time_conditioned=True)
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    log_p = torch.log_softmax(model(x, torch.tensor([5, 50])), dim=1)[:, 1].sum()
    (gradient,) = torch.autograd.grad(log_p, x)
    assert gradient.shape == x.shape and gradient.abs().sum() > 0


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(in_channels=2, image_size=8, num_classes=3), "in_channels"),
        (dict(in_channels=1, image_size=7, num_classes=3), "image_size"),
        (dict(in_channels=1, image_size=8, num_classes=1), "num_classes"),
        (dict(in_channels=1, image_size=8, num_classes=3, width=0), "width"),
    ],
)
def test_invalid_configurations_are_refused(arguments, message):
    with pytest.raises(ConfigError, match=message):
        ClassifierConfig(**arguments)


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"\(1, 8, 8\)"):
        Classifier(1, 8, num_classes=3, width=8)(torch.zeros(2, 3, 8, 8))


# --- training ----------------------------------------------------------------------------------

def test_training_reaches_high_accuracy_on_an_easy_task(trained):
    model, report = trained
    test = shapes_dataset(150, 1, "test")
    assert report["test_accuracy"] > 0.9
    assert report["test_accuracy"] == accuracy(model, test)
    assert report["train_images"] == 300 and report["test_images"] == 150 and report["epochs"] == 3
    assert report["dataset"] == "shapes" and report["noisy"] is False and report["train_seconds"] >= 0


def test_training_is_deterministic_for_a_seed(trained):
    model, _ = trained
    again, _ = train_classifier(shapes_dataset(300, 0, "train"), shapes_dataset(150, 1, "test"), epochs=3, batch_size=32, lr=3e-3, width=8, seed=0)
    for (name, value), other in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(value, other), name


def test_noisy_classifier_reports_accuracy_along_the_chain():
    # A short, mild chain (abar at the last index ~ 0.36: unscaled endpoints), so that a few epochs learn it.
    schedule = linear_schedule(100, beta_start=1e-4, beta_end=0.02)
    model, report = train_classifier(
        shapes_dataset(300, 0, "train"), shapes_dataset(150, 1, "test"), epochs=4, batch_size=32, lr=3e-3,
        width=8, seed=0, noisy=True, schedule=schedule,
    )
    assert model.config.time_conditioned
    assert noisy_report_indices(100) == [0, 25, 50, 75, 99]
    assert noisy_report_indices(1000) == [0, 250, 500, 750, 999]
    by_index = report["accuracy_at_index"]
    assert list(by_index) == ["0", "25", "50", "75", "99"]
    assert by_index["0"] > 0.8  # nearly clean images
    assert by_index["99"] < by_index["0"] - 0.2  # the report measures noised images
    assert report["schedule"] == model.trained_for_schedule == schedule.identity()  # name, T and the betas' hash


def test_training_arguments_are_checked():
    data = shapes_dataset(30, 0, "train")
    with pytest.raises(ConfigError):
        train_classifier(data, data, epochs=0)
    with pytest.raises(ConfigError, match="noisy"):
        train_classifier(data, data, epochs=1, schedule=linear_schedule(30))
    with pytest.raises(ConfigError, match="both a schedule and the indices"):
        accuracy(Classifier(1, 8, num_classes=3, width=8), data, schedule=linear_schedule(30))


# --- files and the cache -----------------------------------------------------------------------

def test_save_load_round_trip_gives_equal_outputs(trained, tmp_path):
    model, report = trained
    directory = save_classifier(model, report, tmp_path / "clf")
    loaded, meta = load_classifier(directory)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert loaded.config == model.config
    assert meta["report"] == json.loads(json.dumps(report))
    assert meta["weights_sha256"] == pooch.file_hash(str(directory / "model.safetensors"))
    assert load_classifier(directory / "config.json")[0].config == model.config  # a file names its folder


def test_missing_or_corrupt_classifier_files_raise_checkpoint_error(trained, tmp_path):
    model, report = trained
    with pytest.raises(CheckpointError, match="holds no classifier"):
        load_classifier(tmp_path / "absent")
    directory = save_classifier(model, report, tmp_path / "clf")
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_classifier(directory)
    (directory / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="damaged"):
        load_classifier(directory)


def test_find_classifier_names_the_command_that_creates_it(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path))
    assert classifier_cache_dir() == tmp_path / "classifiers"
    with pytest.raises(DdpmError, match=r"create it with: ddpm train-classifier --dataset mnist$"):
        find_classifier("mnist")
    with pytest.raises(DdpmError, match=r"ddpm train-classifier --dataset mnist --guide$"):
        find_classifier("mnist", "guide")
    with pytest.raises(DdpmError, match=r"no noisy classifier for mnist and the cosine schedule, T = 50 .*--noisy --schedule cosine --num-steps 50 "):
        find_classifier("mnist", "noisy", cosine_schedule(50))
    save_classifier(*trained, tmp_path / "classifiers" / "mnist")
    assert find_classifier("mnist") == tmp_path / "classifiers" / "mnist"


def _noisy_classifier(report_schedule):
    """An untrained noisy classifier and a report that records ``report_schedule`` (None: no record)."""
    model = Classifier(1, 8, num_classes=3, width=4, time_conditioned=True)
    return model, ({"dataset": "shapes"} if report_schedule is None else {"dataset": "shapes", "schedule": report_schedule})


def test_noisy_classifiers_are_cached_by_schedule_and_refuse_another(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path))
    schedules = {"linear": linear_schedule(50), "cosine": cosine_schedule(50)}
    for schedule in schedules.values():
        save_classifier(*_noisy_classifier(schedule.identity()), classifier_cache_dir() / classifier_dir_name("shapes", "noisy", schedule))
    found = {name: find_classifier("shapes", "noisy", schedule) for name, schedule in schedules.items()}
    assert found["linear"] != found["cosine"]  # an ablation's linear and cosine runs each find their own
    for name, schedule in schedules.items():
        classifier, directory, meta = load_guiding_classifier("shapes", "guided-diffusion", schedule=schedule)
        assert directory == found[name] and classifier.trained_for_schedule == schedule.identity()
    with pytest.raises(ConfigError, match=r"trained for the linear schedule, T = 50 \(betas \w{12}\), but the model samples "
                                          r"with the cosine schedule, T = 50"):
        load_guiding_classifier("shapes", "guided-diffusion", found["linear"], schedule=schedules["cosine"])
    with pytest.raises(ConfigError, match="cosine schedule, T = 50"):  # the sampler itself checks too
        sample(lambda x, t: 0 * x, schedules["cosine"], (2, 1, 8, 8), steps=2, labels=torch.tensor([0, 1]),
               classifier=load_classifier(found["linear"])[0], classifier_scale=1.0)


@pytest.mark.parametrize("record, trained_for", [
    (None, linear_schedule(1000)),  # the first noisy classifiers: linear, T = 1000, recorded nowhere
    ({"name": "linear", "num_steps": 50}, linear_schedule(50, 1e-4, 0.02)),  # before the 1000 / T scaling
    ({"name": "cosine", "num_steps": 50}, cosine_schedule(50)),
])
def test_an_old_noisy_classifier_file_is_read_as_trained_for_the_schedule_of_its_time(record, trained_for, tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path))
    save_classifier(*_noisy_classifier(record), classifier_cache_dir() / "shapes-noisy")  # the old, unkeyed cache folder
    classifier, directory, _ = load_guiding_classifier("shapes", "guided-diffusion", schedule=trained_for)
    assert directory.name == "shapes-noisy" and classifier.trained_for_schedule == trained_for.identity()
    with pytest.raises(ConfigError, match="but the model samples with"):
        load_guiding_classifier("shapes", "guided-diffusion", schedule=linear_schedule(40))


def test_cache_defaults_to_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("DDPMKIT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert classifier_cache_dir() == tmp_path / ".cache" / "ddpmkit" / "classifiers"
