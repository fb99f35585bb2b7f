"""A small CNN image classifier: FID features, and (time-conditioned) classifier guidance.

Two uses, one network:

* Its penultimate activations (``features``, 128 numbers per image) are the feature
  space of the poster's FID and precision/recall on small grayscale datasets, where the
  ImageNet Inception network sees out-of-domain images (see fid.py).
* Built with ``time_conditioned=True`` and trained on noised images x_t (eq. 4 of Ho et
  al. 2020) it is the noisy classifier p(y | x_t, t) of classifier guidance (Dhariwal &
  Nichol 2021, section 4); the step enters as a sinusoidal embedding of the int64 step
  index (the index convention of schedules.py), added to every block's feature maps.

Trained classifiers live in ``classifier_cache_dir()/<folder>/`` as ``model.safetensors``
plus ``config.json`` (constructor arguments, training report and the weights file's SHA-256,
which FID results quote to say which feature space they used), one folder per role
(``classifier_dir_name``):

* "features": ``<dataset>/``, seed 0: FID's feature network, and the judge of guidance sweeps;
* "guide": ``<dataset>-guide/``, seed GUIDE_SEED: a second clean classifier, the poster form's
  guide, so that guided samples are never judged (or their FID measured) by their own guide;
* "noisy": ``<dataset>-noisy-<schedule>-<T>-<betas hash>/``: the time-conditioned guide of the
  guided-diffusion form, one per noise schedule. It records the schedule it was trained for
  (``NoiseSchedule.identity``), and guidance refuses a model of another schedule, whose x_t
  it would classify at the wrong noise level (guidance.check_classifier_schedule). Files of
  noisy classifiers from before that record are read as trained for the schedule their
  report names, as ddpmkit built it then (schedules.schedule_before_scaling), or linear
  with T = 1000 where the report names none; the old cache folder ``<dataset>-noisy/`` is
  still found.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .choices import CLASSIFIER_ROLES, DEFAULT_CLASSIFIER_EPOCHS, GUIDANCE_FORMS, ClassifierRole, GuidanceForm
from .data import FOLDER_PREFIX, ImageDataset, load_dataset
from .errors import CheckpointError, ConfigError, DdpmError
from .guidance import check_classifier_schedule, check_time_conditioning, describe_schedule
from .images import to_model_range
from .io import cache_root, file_sha256, load_weights, safe_name, write_atomically, write_json
from .objectives import draw_timesteps_and_noise
from .rng import ClassifierStream, seeded_generator
from .schedules import NoiseSchedule, linear_schedule, schedule_before_scaling
from .unet import group_norm, timestep_embedding
from .validation import check_choice

FORMAT = "ddpmkit-classifier-1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "config.json"
FEATURE_DIM = 128  # width of the penultimate layer: the FID feature space
GUIDE_SEED = 1  # the "guide" role's training seed; the "features" classifier (the judge) has seed 0


@dataclass(frozen=True)
class ClassifierConfig:
    """The constructor arguments of a Classifier (stored in config.json)."""

    in_channels: int
    image_size: int
    num_classes: int
    width: int = 32
    time_conditioned: bool = False

    def __post_init__(self) -> None:
        if self.in_channels not in (1, 3):
            raise ConfigError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {self.in_channels}")
        if self.image_size < 8:
            raise ConfigError(f"image_size must be >= 8 (the classifier halves it three times), got {self.image_size}")
        if self.num_classes < 2:
            raise ConfigError(f"a classifier needs num_classes >= 2, got {self.num_classes}")
        if self.width < 1:
            raise ConfigError(f"width must be >= 1, got {self.width}")


class _ConvBlock(nn.Module):
    """3x3 conv -> GroupNorm (the UNet's group count) -> (+ step embedding) -> ReLU.

    GroupNorm rather than BatchNorm: an image's features then do not depend on the batch
    it came in, nor on train/eval mode, and a noisy classifier does not average
    statistics over very different noise levels. The step embedding is added after the
    norm, so that normalisation cannot remove it.
    """

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int | None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm = group_norm(out_channels)
        self.step_projection = nn.Linear(embedding_dim, out_channels) if embedding_dim else None

    def forward(self, x: torch.Tensor, step_embedding: torch.Tensor | None) -> torch.Tensor:
        h = self.norm(self.conv(x))
        if self.step_projection is not None:
            h = h + self.step_projection(step_embedding)[:, :, None, None]
        return F.relu(h)


class Classifier(nn.Module):
    """Three stages of conv blocks (width, 2 width and 4 width channels; one block at full
    resolution, where convolutions cost the most, then two), each followed by 2x max
    pooling; the last map (3x3 for 28x28 images, 4x4 for 32x32) is flattened into a
    128-unit fully connected layer (the features), then the logits.

    Flattening rather than global average pooling keeps where things are in the image,
    which digits and clothes need: with average pooling the same network learned several
    times slower on MNIST.
    """

    def __init__(
        self, in_channels: int, image_size: int, num_classes: int, width: int = 32, time_conditioned: bool = False
    ) -> None:
        super().__init__()
        self.config = ClassifierConfig(in_channels, image_size, num_classes, width, time_conditioned)
        # A noisy classifier's NoiseSchedule.identity(), set by train_classifier and
        # load_classifier; guidance.check_classifier_schedule compares it with the model's.
        self.trained_for_schedule: dict[str, Any] | None = None
        embedding_dim = 4 * width if time_conditioned else None
        if time_conditioned:
            # As the UNet's: sinusoidal embedding of the index, then a small MLP.
            self.step_mlp = nn.Sequential(nn.Linear(width, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim))
        self.stages = nn.ModuleList()
        stage_in = in_channels
        for stage_out, blocks in ((width, 1), (2 * width, 2), (4 * width, 2)):
            self.stages.append(nn.ModuleList(
                _ConvBlock(stage_in if number == 0 else stage_out, stage_out, embedding_dim) for number in range(blocks)
            ))
            stage_in = stage_out
        self.penultimate = nn.Linear(4 * width * (image_size // 8) ** 2, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    @classmethod
    def from_config(cls, config: ClassifierConfig) -> Classifier:
        return cls(**asdict(config))

    @property
    def time_conditioned(self) -> bool:
        """Whether it classifies x_t at a step index t (guidance.check_time_conditioning reads this)."""
        return self.config.time_conditioned

    def features(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """The penultimate activations (B, 128) of images x in [-1, 1] (x_t at index t if time-conditioned)."""
        step_embedding = self._step_embedding(x, t)
        h = x
        for stage in self.stages:
            for block in stage:
                h = block(h, step_embedding)
            h = F.max_pool2d(h, 2)
        return F.relu(self.penultimate(h.flatten(1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, num_classes)."""
        return self.head(self.features(x, t))

    def _step_embedding(self, x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor | None:
        config = self.config
        if x.dim() != 4 or tuple(x.shape[1:]) != (config.in_channels, config.image_size, config.image_size):
            raise ConfigError(
                f"this classifier takes images of shape ({config.in_channels}, {config.image_size}, "
                f"{config.image_size}), got {tuple(x.shape[1:])}"
            )
        if not config.time_conditioned:
            if t is not None:
                raise ConfigError("this classifier is not time-conditioned; call it without t")
            return None
        if t is None:
            raise ConfigError("this classifier is time-conditioned: it needs the step index t of x_t")
        t = torch.as_tensor(t, dtype=torch.int64, device=x.device).expand(x.shape[0])
        return self.step_mlp(timestep_embedding(t, config.width))


# --- training -------------------------------------------------------------------------------

def train_classifier(
    train: ImageDataset,
    test: ImageDataset,
    *,
    epochs: int = DEFAULT_CLASSIFIER_EPOCHS,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    width: int = 32,
    noisy: bool = False,
    schedule: NoiseSchedule | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[Classifier, dict[str, Any]]:
    """Train a classifier on ``train`` (images scaled to [-1, 1]) and measure it on ``test``
    (``progress``: a bar over the optimizer steps).

    Adam with a cosine learning-rate decay to 0 over the whole run (reaching the
    accuracy targets in a few epochs). ``noisy=True`` builds a time-conditioned
    classifier and trains it on x_t = q_sample(x0, t, noise) with t uniform over the
    schedule's indices (default schedule: linear, T = 1000), as Dhariwal & Nichol do.

    The report holds ``test_accuracy``: on clean test images, or, for a noisy classifier,
    on test images noised at a uniformly drawn index (seeded, the same every run); a
    noisy classifier also gets ``accuracy_at_index`` at indices 0, T/4, T/2, 3T/4, T-1, and
    ``schedule``, the schedule's identity (name, T, betas hash), which the returned model
    carries too (``trained_for_schedule``).
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ConfigError(f"need epochs >= 1, batch_size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    if schedule is not None and not noisy:
        raise ConfigError("a schedule is only used to train a noisy classifier (noisy=True)")
    if noisy and schedule is None:
        schedule = linear_schedule()
    info = train.info
    device = torch.device(device)
    torch.manual_seed(seed)  # the initial weights
    model = Classifier(info.channels, info.image_size, info.num_classes, width=width, time_conditioned=noisy).to(device)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    noise_generator = seeded_generator(seed, ClassifierStream.NOISE)
    started = time.perf_counter()
    model.train()
    bar = tqdm(total=epochs * steps_per_epoch, unit="step", desc="classifier", disable=not progress, dynamic_ncols=True)
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=seeded_generator(seed, ClassifierStream.ORDER, epoch))
        for batch_indices in order.split(batch_size):
            x = to_model_range(train.images[batch_indices]).to(device)
            y = train.labels[batch_indices].to(device)
            t = None
            if noisy:  # eq. 4 at a uniformly drawn index per image
                t, noise = draw_timesteps_and_noise(schedule, tuple(x.shape), noise_generator)
                t = t.to(device)
                x = schedule.q_sample(x, t, noise.to(device))
            loss = F.cross_entropy(model(x, t), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_schedule.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    train_seconds = time.perf_counter() - started
    model.eval()
    report: dict[str, Any] = {
        "dataset": info.name,
        "train_split": train.split,
        "test_split": test.split,
        "train_images": len(train),
        "test_images": len(test),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "noisy": noisy,
        "device": str(device),
        "train_seconds": round(train_seconds, 1),
    }
    if noisy:
        test_generator = seeded_generator(seed, ClassifierStream.TEST_STEPS)
        uniform = torch.randint(0, schedule.num_steps, (len(test),), generator=test_generator)
        report["schedule"] = model.trained_for_schedule = schedule.identity()
        report["test_accuracy"] = accuracy(model, test, schedule=schedule, t=uniform, seed=seed)
        report["accuracy_at_index"] = {
            str(index): accuracy(model, test, schedule=schedule, t=torch.full((len(test),), index), seed=seed)
            for index in noisy_report_indices(schedule.num_steps)
        }
    else:
        report["test_accuracy"] = accuracy(model, test)
    return model, report


def noisy_report_indices(num_steps: int) -> list[int]:
    """The step indices at which a noisy classifier's accuracy is reported: the ends and
    quarters of the chain, 0, 250, 500, 750, 999 for T = 1000."""
    return sorted({0, num_steps // 4, num_steps // 2, 3 * num_steps // 4, num_steps - 1})


@torch.no_grad()
def accuracy(
    model: Classifier,
    dataset: ImageDataset,
    *,
    schedule: NoiseSchedule | None = None,
    t: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 500,
) -> float:
    """The fraction of ``dataset`` classified correctly; with ``schedule`` and ``t``
    (one index per image), of the images noised to x_t with noise seeded by ``seed``."""
    if (schedule is None) != (t is None):
        raise ConfigError("accuracy on noised images needs both a schedule and the indices t")
    device = next(model.parameters()).device
    noise_generator = seeded_generator(seed, ClassifierStream.TEST_NOISE)
    correct = 0
    for first in range(0, len(dataset), batch_size):
        part = slice(first, first + batch_size)
        x = to_model_range(dataset.images[part]).to(device)
        t_part = None
        if schedule is not None:
            noise = torch.randn(x.shape, generator=noise_generator).to(device)
            t_part = t[part].to(device)
            x = schedule.q_sample(x, t_part, noise)
        predicted = model(x, t_part).argmax(dim=1).cpu()
        correct += int((predicted == dataset.labels[part]).sum())
    return correct / len(dataset)


def classifier_splits(
    dataset: str, *, data_dir: str | Path | None = None, image_size: int | None = None, channels: int | None = None
) -> tuple[ImageDataset, ImageDataset]:
    """The images a dataset's classifier trains on, and the test split it is measured on.

    It trains on every image outside the test split, train and val together: the val
    split is held out for the diffusion model, not for the classifier. A ``folder:``
    dataset has no test set (its "test" split is its "val" split, see data.py), so its
    classifier trains on "train" alone, lest it be measured on images it learned.
    ``image_size`` and ``channels`` are load_dataset's, for folder: datasets.
    """
    geometry = dict(data_dir=data_dir, image_size=image_size, channels=channels)
    train = load_dataset(dataset, "train", **geometry)
    test = load_dataset(dataset, "test", **geometry)
    if dataset.startswith(FOLDER_PREFIX):
        return train, test
    val = load_dataset(dataset, "val", **geometry)
    train_and_val = ImageDataset(
        images=torch.cat([train.images, val.images]), labels=torch.cat([train.labels, val.labels]),
        info=train.info, split="train+val",
    )
    return train_and_val, test


def train_and_cache_classifier(
    dataset: str,
    *,
    role: ClassifierRole = "features",
    data_dir: str | Path | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    schedule: NoiseSchedule | None = None,
    device: str | torch.device = "cpu",
    out: str | Path | None = None,
    **training: Any,
) -> tuple[Path, dict[str, Any]]:
    """What ``ddpm train-classifier --dataset NAME`` does: train the classifier of ``role``
    (module docstring; "noisy" for ``schedule``, default linear with T = 1000) on
    classifier_splits, then save into ``out``, by default where ``find_classifier`` looks.
    Returns the directory and the report.

    ``training`` goes to train_classifier (epochs, batch_size, lr, width; the seed is the role's).
    """
    check_choice("classifier role", role, CLASSIFIER_ROLES)
    if role == "noisy" and schedule is None:
        schedule = linear_schedule()
    train, test = classifier_splits(dataset, data_dir=data_dir, image_size=image_size, channels=channels)
    model, report = train_classifier(
        train, test, noisy=role == "noisy", schedule=schedule, device=device, seed=GUIDE_SEED if role == "guide" else 0, **training
    )
    report["role"] = role
    directory = Path(out) if out is not None else classifier_cache_dir() / classifier_dir_name(dataset, role, schedule)
    save_classifier(model, report, directory)
    return directory, report


# --- files ------------------------------------------------------------------------------------

def save_classifier(model: Classifier, report: dict[str, Any], directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (config, report, weights SHA-256) into
    directory, each atomically (io.write_atomically)."""
    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    state = {name: value.detach().cpu().contiguous() for name, value in model.state_dict().items()}
    write_atomically(weights, lambda temporary: save_file(state, str(temporary)), what="classifier weights")
    meta = {
        "format": FORMAT,
        "ddpmkit_version": __version__,
        "config": asdict(model.config),
        "report": report,
        "weights_sha256": file_sha256(weights),
    }
    write_json(directory / META_FILE, meta, what="classifier config")
    return directory


def load_classifier(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """The classifier saved in directory ``path`` (or beside file ``path``), in eval mode,
    and its config.json contents (config, report, weights_sha256)."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    meta_path, weights = directory / META_FILE, directory / WEIGHTS_FILE
    if not meta_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{directory} holds no classifier (it needs {META_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
        config = ClassifierConfig(**meta["config"])
        recorded_hash = meta["weights_sha256"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{meta_path} is damaged ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} does not describe a ddpmkit classifier (format {meta.get('format')!r})")
    if file_sha256(weights) != recorded_hash:
        raise CheckpointError(f"{weights} is corrupt: its SHA-256 differs from the one recorded in {META_FILE}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({exc})") from None
    model = Classifier.from_config(config)
    load_weights(model, state, source=str(weights))
    if config.time_conditioned:
        model.trained_for_schedule = _recorded_schedule(meta["report"])
    return model.to(device).eval(), meta


def _recorded_schedule(report: dict[str, Any]) -> dict[str, Any]:
    """The schedule identity a noisy classifier's report records; for a file from before the
    betas hash was recorded, that of the schedule it names as ddpmkit built it then, linear
    with T = 1000 (the only schedule of the first noisy classifiers) where it names none."""
    record = report.get("schedule") or {"name": "linear", "num_steps": 1000}
    if "betas_sha256" in record:
        return record
    return schedule_before_scaling(record["name"], int(record["num_steps"])).identity()


def classifier_cache_dir() -> Path:
    return cache_root() / "classifiers"


def classifier_dir_name(dataset: str, role: ClassifierRole = "features", schedule: NoiseSchedule | None = None) -> str:
    """The cache folder of ``dataset``'s classifier of ``role``; a noisy one's names its schedule."""
    check_choice("classifier role", role, CLASSIFIER_ROLES)
    if (role == "noisy") != (schedule is not None):
        raise ConfigError("a noisy classifier's folder is named by its schedule, and only a noisy one's")
    if role == "noisy":
        identity = schedule.identity()
        return f"{safe_name(dataset)}-noisy-{identity['name']}-{identity['num_steps']}-{identity['betas_sha256'][:12]}"
    return safe_name(dataset) + ("-guide" if role == "guide" else "")


def find_classifier(dataset: str, role: ClassifierRole = "features", schedule: NoiseSchedule | None = None) -> Path:
    """The cached classifier directory of ``dataset`` and ``role`` (a noisy one: for
    ``schedule``), or an error naming the command that creates it."""
    directory = classifier_cache_dir() / classifier_dir_name(dataset, role, schedule)
    legacy = classifier_cache_dir() / f"{safe_name(dataset)}-noisy"  # before the cache was keyed by schedule
    if role == "noisy" and not (directory / META_FILE).is_file() and (legacy / META_FILE).is_file():
        return legacy
    if not (directory / META_FILE).is_file():
        command = f"ddpm train-classifier --dataset {dataset}"
        what = {"features": "classifier", "guide": "guiding classifier (poster form)", "noisy": "noisy classifier"}[role]
        what += f" for {dataset}"
        if role == "noisy":
            identity = schedule.identity()
            command += f" --noisy --schedule {identity['name']} --num-steps {identity['num_steps']} (or --noisy --for RUN)"
            what += f" and the {describe_schedule(identity)}"
        elif role == "guide":
            command += " --guide"
        raise DdpmError(f"no {what} in {directory}; create it with: {command}")
    return directory


def load_guiding_classifier(
    dataset: str,
    form: GuidanceForm,
    path: str | Path | None = None,
    *,
    schedule: NoiseSchedule,
    device: str | torch.device = "cpu",
) -> tuple[Classifier, Path, dict[str, Any]]:
    """The classifier that guides a model of ``schedule`` in ``form``, where it was read from,
    and its config.json contents: ``path``, else the dataset's cached one, "noisy" (for that
    schedule) in the "guided-diffusion" form, "guide" in the "poster" form."""
    check_choice("guidance_form", form, GUIDANCE_FORMS)
    if path is not None:
        directory = Path(path)
    elif form == "guided-diffusion":
        directory = find_classifier(dataset, "noisy", schedule)
    else:
        directory = find_classifier(dataset, "guide")
    classifier, meta = load_classifier(directory, device=device)
    check_time_conditioning(classifier, form)
    check_classifier_schedule(classifier, schedule)
    return classifier, directory, meta


def classifier_provenance(path: str | Path, role: str = "classifier") -> dict[str, str]:
    """What a result records of a classifier it used: ``{role: its directory (absolute),
    role_sha256: its weights file's SHA-256}``."""
    directory = Path(path).resolve()
    return {role: str(directory), f"{role}_sha256": file_sha256(directory / WEIGHTS_FILE)}
