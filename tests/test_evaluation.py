"""FID, precision/recall, feature caches, resumable FID and the FID Inception network."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from ddpmkit import fid, inception, metrics
from ddpmkit.data import DatasetInfo, ImageDataset
from ddpmkit.errors import CheckpointError, ConfigError, DdpmError
from ddpmkit.fid import FeatureExtractor, compute_fid, minibatch_fid, real_vs_real, reference_features
from ddpmkit.images import to_model_range
from ddpmkit.inception import FIDInceptionV3
from ddpmkit.metrics import FeatureStats, frechet_distance, frechet_distance_from_stats, precision_recall
from ddpmkit.schedules import linear_schedule


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with a general matrix square root (scipy.linalg.sqrtm), float64."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    return float((mu_a - mu_b) @ (mu_a - mu_b) + np.trace(cov_a + cov_b - 2 * root.real))


# --- Frechet distance ---------------------------------------------------------------------------

def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(300, 16))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_diagonal_gaussians_has_the_closed_form():
    # For commuting (here diagonal) covariances Tr((C1 C2)^{1/2}) = sum sqrt(a_i b_i), so
    # d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2: the 1-D formula summed.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()  # 7.25 + 4 + 1
    assert frechet_distance_from_stats(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(12.25)


def test_frechet_distance_matches_scipy_sqrtm_on_random_features():
    rng = np.random.default_rng(1)
    # Correlated features with different means and covariances: C_a C_b is not symmetric.
    a = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12))
    b = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12)) + 0.5
    assert frechet_distance(a, b) == pytest.approx(scipy_frechet(a, b), rel=1e-9)
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == pytest.approx(scipy_frechet(a, b), rel=1e-4)


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # scipy's, on the reference side
@pytest.mark.parametrize("case", ["fewer samples than dimensions", "duplicated and dead columns"])
def test_rank_deficient_covariances_give_a_finite_value_close_to_scipy(case):
    rng = np.random.default_rng(2)
    if case == "fewer samples than dimensions":
        a, b = rng.normal(size=(20, 40)), rng.normal(size=(25, 40)) + 0.3
    else:
        base_a, base_b = rng.normal(size=(200, 6)), rng.normal(size=(200, 6)) * 1.5
        a = np.concatenate([base_a, base_a[:, :3], np.zeros((200, 2))], axis=1)
        b = np.concatenate([base_b, base_b[:, :3], np.zeros((200, 2))], axis=1)
    value = frechet_distance(a, b)
    assert isinstance(value, float) and np.isfinite(value) and value >= 0
    assert value == pytest.approx(scipy_frechet(a, b), rel=1e-5)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ConfigError):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ConfigError):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# --- precision and recall ----------------------------------------------------------------------

def test_precision_recall_of_a_hand_worked_example():
    # k = 1. Real radii: 1, 1, 1, 1, 7 (10's nearest is 3). Fake radii: 2.6, 2.6, 15.
    # Precision: 2.4 (near 2) and 5 (|5 - 10| <= 7) are inside, 20 is not: 2/3.
    # Recall: 0..3 lie within 2.6 of 2.4, and 10 within 15 of 20: 5/5.
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    fake = np.array([[2.4], [5.0], [20.0]])
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(2 / 3)
    assert recall == 1.0


def test_precision_recall_of_identical_and_of_far_apart_sets():
    points = np.random.default_rng(3).normal(size=(200, 8))
    assert precision_recall(points, points) == (1.0, 1.0)
    assert precision_recall(points, points + 100.0) == (0.0, 0.0)


def test_mode_dropping_keeps_precision_and_loses_recall():
    # Two well separated 2-D modes; the "model" covers only the first.
    rng = np.random.default_rng(4)
    far = np.array([20.0, 0.0])
    real = np.concatenate([rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) + far])
    fake = rng.normal(size=(600, 2))
    precision, recall = precision_recall(real, fake)
    assert precision > 0.9
    assert 0.4 < recall < 0.55  # about half: the second mode is never generated


def test_precision_recall_blocks_give_the_unblocked_result(monkeypatch):
    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(150, 4)), rng.normal(size=(150, 4)) * 1.3
    whole = precision_recall(real, fake)
    monkeypatch.setattr(metrics, "_DISTANCE_BLOCK_ENTRIES", 150 * 7)  # blocks of 7 rows
    assert precision_recall(real, fake) == whole
    assert 0.5 < whole[0] < 1.0 and 0.5 < whole[1] < 1.0  # a non-trivial case


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(ConfigError):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)


# --- reference features and their cache ----------------------------------------------------------

def tolerance(device: torch.device, rtol: float, atol: float) -> dict[str, float]:
    """rtol and atol of features on ``device`` against the same network on the CPU: those
    given on the CPU; on a GPU 1e-4 and 1e-5, since cuDNN's convolution algorithms sum in
    other orders than oneDNN's (TF32 is off, conftest), float32 rounding that a deep network
    like Inception carries to about 1e-5 of a feature's size."""
    return dict(rtol=rtol, atol=atol) if device.type == "cpu" else dict(rtol=max(rtol, 1e-4), atol=max(atol, 1e-5))

def tiny_dataset(split: str, count: int = 64, seed: int = 0) -> ImageDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 1, 8, 8), generator=generator, dtype=torch.uint8)
    info = DatasetInfo(name="toy", channels=1, image_size=8, num_classes=2, class_names=("a", "b"))
    return ImageDataset(images=images, labels=torch.zeros(count, dtype=torch.int64), info=info, split=split)


def mean_pool_extractor(sha: str = "a" * 64, device: torch.device = torch.device("cpu")) -> FeatureExtractor:
    """Features: the mean of each 2x2 quarter of the image (4 numbers), deterministic."""
    return FeatureExtractor(
        name="quarters", weights_sha256=sha, device=device,
        network=lambda x: torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1),
    )


def failing_extractor() -> FeatureExtractor:
    def network(x):
        raise AssertionError("the cache should have been used")

    return FeatureExtractor(name="quarters", weights_sha256="a" * 64, device=torch.device("cpu"), network=network)


def test_reference_features_are_cached_and_reused(tmp_path):
    dataset = tiny_dataset("test")
    first = reference_features(dataset, mean_pool_extractor(), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("toy-test-*.npz"))) == 1
    again = reference_features(dataset, failing_extractor(), cache_dir=tmp_path)
    np.testing.assert_array_equal(again.features, first.features)
    np.testing.assert_array_equal(again.stats.cov, first.stats.cov)
    assert again.stats.n == 64 and again.name == "toy/test"
    expected = FeatureStats.from_features(mean_pool_extractor()(dataset.images))
    np.testing.assert_allclose(first.stats.mean, expected.mean)
    # Other images (same name and split) must not reuse the cached features.
    with pytest.raises(AssertionError, match="cache should have been used"):
        reference_features(tiny_dataset("test", seed=1), failing_extractor(), cache_dir=tmp_path)


def test_a_damaged_cache_file_is_recomputed(tmp_path):
    dataset = tiny_dataset("train")
    reference_features(dataset, mean_pool_extractor(), cache_dir=tmp_path)
    (cached,) = tmp_path.glob("*.npz")
    cached.write_bytes(b"not an npz")
    again = reference_features(dataset, mean_pool_extractor(), cache_dir=tmp_path)
    assert again.features.shape == (64, 4)
    assert np.load(cached)["features"].shape == (64, 4)


def test_extractor_quantises_generated_samples_like_saved_images():
    extractor = mean_pool_extractor()
    samples = torch.full((3, 1, 8, 8), 0.3001)  # between two uint8 levels
    features = fid.generated_features(extractor, samples)
    level = round((0.3001 + 1) * 127.5)  # 166
    np.testing.assert_allclose(features, level / 127.5 - 1, rtol=1e-6)
    with pytest.raises(ConfigError):
        extractor(samples)  # floats are refused: the extractor takes uint8 images


def test_classifier_extractor_gives_the_penultimate_features(tmp_path, monkeypatch, device):
    from ddpmkit.classifier import Classifier, save_classifier

    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model = Classifier(1, 8, num_classes=2, width=8).eval()
    save_classifier(model, {"dataset": "toy"}, tmp_path / "classifiers" / "toy")
    extractor = fid.load_extractor("classifier", "toy", device=device)
    images = tiny_dataset("test").images
    with torch.no_grad():
        expected = model.features(to_model_range(images)).numpy()
    np.testing.assert_allclose(extractor(images), expected, **tolerance(device, rtol=1e-6, atol=1e-7))
    assert extractor.name == "classifier:toy"
    assert extractor.weights_sha256 == json.loads((tmp_path / "classifiers" / "toy" / "config.json").read_text())["weights_sha256"]

    save_classifier(Classifier(1, 8, num_classes=2, width=8, time_conditioned=True), {}, tmp_path / "noisy")
    with pytest.raises(ConfigError, match="time-conditioned"):
        fid.classifier_extractor(tmp_path / "noisy")
    with pytest.raises(ConfigError, match="unknown feature extractor"):
        fid.load_extractor("vgg", "toy")


# --- compute_fid, resumable -------------------------------------------------------------------

def batch_generator(calls: list[int], *, stop_after: int | None = None, num: int = 50, batch_size: int = 16):
    """generate(start_batch): batch k is a fixed function of k (as sample_batches)."""

    def generate(start_batch):
        calls.append(start_batch)
        for k in range(start_batch, -(-num // batch_size)):
            if stop_after is not None and k == stop_after:
                raise KeyboardInterrupt
            count = min(batch_size, num - k * batch_size)
            yield torch.rand((count, 1, 8, 8), generator=torch.Generator().manual_seed(k)) * 2 - 1

    return generate


def test_compute_fid_reports_metrics_and_provenance(tmp_path, device):
    references = [tiny_dataset("train", 80), tiny_dataset("test", 40, seed=2)]
    extractor = mean_pool_extractor(device=device)
    result = compute_fid(batch_generator([]), 50, extractor, references, settings={"sampler": "ddim", "steps": 10}, cache_dir=tmp_path)
    assert set(result["splits"]) == {"toy/train", "toy/test"}
    assert result["num_generated"] == 50
    assert result["reference_images"] == {"toy/train": 80, "toy/test": 40}
    assert result["extractor"] == "quarters" and result["extractor_sha256"] == "a" * 64
    assert result["settings"] == {"sampler": "ddim", "steps": 10}
    # Uniform noise images vs uniform noise images: a small FID, computed as documented.
    fake = np.concatenate([fid.generated_features(extractor, b) for b in batch_generator([])(0)])
    train = reference_features(references[0], extractor, cache_dir=tmp_path)
    assert result["splits"]["toy/train"]["fid"] == pytest.approx(frechet_distance(train.features, fake), rel=1e-9)
    assert result["splits"]["toy/train"]["precision"] == pytest.approx(
        precision_recall(fid._subset(train.features, 50), fake)[0]
    )


def test_compute_fid_resumes_where_it_stopped(tmp_path):
    references = [tiny_dataset("train", 80)]
    extractor = mean_pool_extractor()
    settings = {"seed": 3, "batch_size": 16}
    uninterrupted = compute_fid(batch_generator([]), 50, extractor, references, settings=settings, cache_dir=tmp_path)

    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        compute_fid(batch_generator([], stop_after=2), 50, extractor, references, settings=settings, work_dir=work, cache_dir=tmp_path)
    [store] = (work / "generated-features").iterdir()  # a folder named by the settings
    assert sorted(p.name for p in store.glob("batch-*.npy")) == ["batch-000000.npy", "batch-000001.npy"]
    calls: list[int] = []
    resumed = compute_fid(batch_generator(calls), 50, extractor, references, settings=settings, work_dir=work, cache_dir=tmp_path)
    assert calls == [2]  # batches 0 and 1 were not generated again
    assert resumed == uninterrupted

    finished: list[int] = []
    assert compute_fid(batch_generator(finished), 50, extractor, references, settings=settings, work_dir=work, cache_dir=tmp_path) == uninterrupted
    assert finished == []  # everything was done: no generation at all

    # Other settings (another seed, or --num) get a folder of their own; the first one stays.
    other: list[int] = []
    compute_fid(batch_generator(other), 50, extractor, references, settings={**settings, "seed": 4}, work_dir=work, cache_dir=tmp_path)
    compute_fid(batch_generator(other), 40, extractor, references, settings=settings, work_dir=work, cache_dir=tmp_path)
    assert other == [0, 0] and len(list((work / "generated-features").iterdir())) == 3
    # A settings file that does not match its folder (damaged, or copied by hand) is refused, not trusted.
    (store / "settings.json").write_text("{}")
    with pytest.raises(ConfigError, match="other settings"):
        compute_fid(batch_generator([]), 50, extractor, references, settings=settings, work_dir=work, cache_dir=tmp_path)


def test_compute_fid_refuses_a_short_generator(tmp_path):
    with pytest.raises(DdpmError, match="stopped after 50 of 60"):
        compute_fid(batch_generator([]), 60, mean_pool_extractor(), [tiny_dataset("train")], settings={}, cache_dir=tmp_path)


def test_real_vs_real_of_a_split_with_itself_is_zero(tmp_path):
    split = tiny_dataset("train")
    result = real_vs_real(split, split, mean_pool_extractor(), cache_dir=tmp_path)
    assert result["splits"]["toy/train"]["fid"] == pytest.approx(0.0, abs=1e-6)
    assert (result["splits"]["toy/train"]["precision"], result["splits"]["toy/train"]["recall"]) == (1.0, 1.0)
    other = real_vs_real(split, tiny_dataset("test", seed=5), mean_pool_extractor(), cache_dir=tmp_path)
    assert other["splits"]["toy/train"]["fid"] > 0 and other["compared"] == "toy/test"


def test_minibatch_fid_compares_samples_with_a_fixed_class_balanced_subset(device):
    validation = tiny_dataset("val", 40)
    schedule = linear_schedule(30)
    extractor = mean_pool_extractor(device=device)

    def model(x_t, t):  # a fixed toy noise predictor
        return 0.5 * x_t

    kwargs = dict(sampler="ddim", steps=4, device=device)
    value = minibatch_fid(model, schedule, validation, extractor, num_images=24, batch_size=8, seed=7, **kwargs)
    from ddpmkit.samplers import sample_batches

    samples = torch.cat(list(sample_batches(model, schedule, 24, 8, (1, 8, 8), seed=7, **kwargs)))
    assert samples.device.type == device.type
    chosen = fid.class_balanced_indices(validation.labels, 24)
    expected = frechet_distance(extractor(validation.images[chosen]), fid.generated_features(extractor, samples))
    assert value == pytest.approx(expected, rel=1e-9)


def test_class_balanced_indices_take_each_class_equally_often_where_they_can():
    labels = torch.tensor([0] * 30 + [1] * 5 + [2] * 20)
    chosen = fid.class_balanced_indices(labels, 12)
    assert torch.bincount(labels[chosen]).tolist() == [4, 4, 4]
    assert chosen.tolist() == sorted(set(chosen.tolist())) and torch.equal(chosen, fid.class_balanced_indices(labels, 12))
    more = fid.class_balanced_indices(labels, 20)
    assert torch.bincount(labels[more]).tolist() in ([8, 5, 7], [7, 5, 8])  # class 1 has only 5
    assert set(chosen.tolist()) != set(range(12)) and len(fid.class_balanced_indices(labels, 55)) == 55


def test_the_per_epoch_fid_of_a_class_ordered_folder_covers_every_class(tmp_path):
    # A folder: dataset's validation split is ordered by class; the first images are the first classes'.
    from conftest import write_folder_dataset
    from ddpmkit.data import load_dataset

    folder = write_folder_dataset(tmp_path / "four", per_class=40, classes=("a", "b", "c", "d"))
    validation = load_dataset(f"folder:{folder}", "val", image_size=8, channels=1)
    assert validation.labels.tolist() == sorted(validation.labels.tolist()) and len(set(validation.labels[:8].tolist())) < 4
    seen_images, seen_labels = [], []
    spy = FeatureExtractor(name="spy", weights_sha256="b" * 64, device=torch.device("cpu"),
                           network=lambda x: seen_images.append(x) or torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))

    def conditional_model(x_t, t, y):
        seen_labels.append(y)
        return 0.5 * x_t

    minibatch_fid(conditional_model, linear_schedule(30), validation, spy, num_images=8, batch_size=4, seed=0, labelled=True,
                  sampler="ddim", steps=1)  # one model call per batch
    reference = seen_images[0]  # the real images come first
    labelled_images = [(int(label), to_model_range(image)) for image, label in zip(validation.images, validation.labels)]
    labels = [next(label for label, image in labelled_images if torch.equal(image, row)) for row in reference]
    assert len(labels) == 8 and sorted(labels) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.cat(seen_labels).tolist() == labels  # each sample drawn with its reference image's label


# --- the FID Inception network ------------------------------------------------------------------

def test_fid_inception_has_pytorch_fids_state_dict_layout():
    state = FIDInceptionV3().state_dict()
    # 94 conv+bn units (stem 5, 3 x A 7, B 4, 4 x C 10, D 6, 2 x E 9), 5 entries each, + fc.
    assert len(state) == 94 * 5 + 2
    shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch3x3dbl_1.conv.weight": (448, 2048, 1, 1),
        "fc.weight": (1008, 2048),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    # torchvision's inception_v3 has 27,161,264 parameters; without its auxiliary head
    # (3,326,696) and with 1008 instead of 1000 classes (+8 x 2049): 23,850,960.
    learned = sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var")))
    assert learned == 27_161_264 - 3_326_696 + 8 * 2049


def _torch_fidelity_inception_class():
    """torch-fidelity's FeatureExtractorInceptionV3: an independent port of the same TensorFlow
    graph, installed by the Makefile without its dependencies (they pull torchvision). Its
    package __init__ imports torchvision, so the module is loaded under a bare package."""
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("torch_fidelity")
    assert spec is not None, "torch-fidelity is a test dependency: make install puts it in .venv"
    if not hasattr(sys.modules.get("torch_fidelity"), "__path__"):
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


def test_fid_inception_equals_torch_fidelitys_port_of_the_tensorflow_graph(tmp_path):
    # The real weights cannot be downloaded here; random weights in the file's layout, with
    # batch-norm statistics away from identity, exercise every layer and pooling quirk.
    generator = torch.Generator().manual_seed(0)
    ours = FIDInceptionV3().eval()
    state = ours.state_dict()
    for key, value in state.items():
        if key.endswith("running_var"):
            value.copy_(torch.rand(value.shape, generator=generator) * 2 + 0.5)
        elif key.endswith(("running_mean", "bn.bias")):
            value.copy_(torch.randn(value.shape, generator=generator) * 0.1)
        elif key.endswith("bn.weight"):
            value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
    path = tmp_path / "random-inception.pth"
    torch.save(state, path)
    theirs = _torch_fidelity_inception_class()("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    # 299 x 299 inputs: both resizes are then the identity (torch-fidelity resizes like
    # TensorFlow 1, pytorch-fid and ddpmkit with F.interpolate), and torch-fidelity's
    # (x - 128) / 128 is applied here to ours.
    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=generator)
    with torch.inference_mode():
        (expected,) = theirs(images)
        features = ours((images.float() - 128) / 128)
        assert features.std() > 0.01
        torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
        # The comparison sees the TensorFlow graph's quirks: an average pool in the last
        # block (torchvision's choice) changes the features.
        ours.Mixed_7c.pool = inception._tf_average_pool
        assert (ours((images.float() - 128) / 128) - expected).abs().max() > 1e-3


def test_inception_weights_missing_offline_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise ConnectionError("no network")  # what requests' ConnectionError also is (an OSError)

    monkeypatch.setattr("pooch.retrieve", offline)
    with pytest.raises(DdpmError, match="pt_inception-2015-12-05-6726825d.pth") as error:
        fid.inception_extractor()
    assert str(tmp_path / "cache" / "inception") in str(error.value)
    with pytest.raises(DdpmError, match="does not exist"):
        fid.inception_extractor(tmp_path / "nowhere.pth")


def test_inception_weights_are_loaded_strictly_and_checked(tmp_path, monkeypatch, device):
    torch.manual_seed(0)
    network = FIDInceptionV3()
    state = dict(network.state_dict())
    # Files written from torchvision's modules also hold batch-norm step counters.
    state.update({k.replace("running_var", "num_batches_tracked"): torch.tensor(0) for k in list(state) if k.endswith("running_var")})
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="not the FID Inception weights"):
        inception.load_inception(path)
    import pooch

    monkeypatch.setattr(inception, "INCEPTION_SHA256_PREFIX", pooch.file_hash(str(path))[:8])
    extractor = fid.inception_extractor(path, device=device)
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    features = extractor(images)
    assert features.shape == (2, 2048) and np.isfinite(features).all()
    with torch.inference_mode():
        expected = network.eval()(to_model_range(images).expand(-1, 3, -1, -1))
    np.testing.assert_allclose(features, expected.numpy(), **tolerance(device, rtol=1e-5, atol=1e-6))
    assert extractor.weights_sha256 == pooch.file_hash(str(path))

    del state["fc.bias"]
    torch.save(state, path)
    monkeypatch.setattr(inception, "INCEPTION_SHA256_PREFIX", pooch.file_hash(str(path))[:8])
    with pytest.raises(CheckpointError, match="missing: fc.bias"):
        inception.load_inception(path)
