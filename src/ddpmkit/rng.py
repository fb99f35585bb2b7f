"""Seeded random streams: every draw of ddpmkit comes from a generator named by its keys.

``seeded_generator(seed, stream, *more)`` mixes its integer keys with numpy's
SeedSequence, so distinct key tuples give independent streams. The stream tags of each
consumer are listed here, once; their values are part of every recorded result (a
changed tag changes the draws), so they never change.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class TrainingStream(IntEnum):
    """Streams of ``train`` (training.py), keyed further by epoch or step where noted."""

    EPOCH_ORDER = 1  # + epoch: the permutation of the training images
    STEP = 2  # + step: timesteps, noise and label dropout of one optimizer step
    VALIDATION = 3  # the fixed timesteps and noise of the validation loss
    PREVIEW = 4  # the per-epoch sample grid
    FID = 5  # the per-epoch FID samples
    FLIP = 6  # + step: the horizontal flips of one optimizer step (random_flip)


class ClassifierStream(IntEnum):
    """Streams of ``train_classifier`` and ``accuracy`` (classifier.py)."""

    ORDER = 1  # + epoch: the permutation of the training images
    NOISE = 2  # timesteps and noise of the noisy classifier's training images
    TEST_STEPS = 3  # the uniform timesteps of its test accuracy
    TEST_NOISE = 4  # the noise of noised test images


class LikelihoodStream(IntEnum):
    """Streams of the NLL evaluation (likelihood.py)."""

    SUBSET = 1  # which images of a split are evaluated, when not all
    NOISE = 2  # + batch: the noise of x_t at every step, for one batch of images


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator whose seed mixes all keys (numpy's SeedSequence avoids collisions)."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)
