"""Every named choice of ddpmkit, as a ``Literal`` type and the tuple of its values.

One torch-free module, so that the config and the command line's parser (``ddpm --help``)
know every choice without importing torch. Each choice is documented where it is used:

* ``ScheduleName``: the beta schedules (schedules.py); ``PredictionName``: what the network
  predicts (eps, x0 or v; schedules.py converts between them);
* ``LossWeighting``: the weighting of the training loss over t (objectives.py);
* ``SamplerName``, ``VarianceName``, ``SpacingName``: samplers.py;
* ``GuidanceForm``: the two forms of classifier guidance (guidance.py);
* ``FeatureKind``: the FID feature networks (fid.py); ``SweepKind``: guidance sweeps (sweeps.py);
* ``Split``: dataset splits (data.py); ``Precision``, ``Device``: training (config.py);
* ``AttentionSwitch``: the ablation's attention axis (ablation.py);
* ``ClassifierRole``: what a cached classifier is for (classifier.py).

Also here, for the same reason: the few defaults and file names that help texts show.
"""

from __future__ import annotations

from typing import Literal, get_args

ScheduleName = Literal["linear", "cosine"]
SamplerName = Literal["ddpm", "ddim", "dpm-solver++", "dpm-solver++-sde"]
VarianceName = Literal["beta", "posterior", "learned"]
PredictionName = Literal["eps", "x0", "v"]
LossWeighting = Literal["none", "min-snr"]
SpacingName = Literal["uniform", "quadratic", "trailing"]
GuidanceForm = Literal["guided-diffusion", "poster"]
FeatureKind = Literal["classifier", "inception"]
SweepKind = Literal["classifier-free", "classifier"]
Split = Literal["train", "val", "test"]
Precision = Literal["fp32", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda"]
AttentionSwitch = Literal["on", "off"]
ClassifierRole = Literal["features", "guide", "noisy"]

SCHEDULE_NAMES: tuple[str, ...] = get_args(ScheduleName)
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
VARIANCE_NAMES: tuple[str, ...] = get_args(VarianceName)
PREDICTION_NAMES: tuple[str, ...] = get_args(PredictionName)
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)
SPACING_NAMES: tuple[str, ...] = get_args(SpacingName)
GUIDANCE_FORMS: tuple[str, ...] = get_args(GuidanceForm)
FEATURE_KINDS: tuple[str, ...] = get_args(FeatureKind)
SWEEP_KINDS: tuple[str, ...] = get_args(SweepKind)
SPLITS: tuple[str, ...] = get_args(Split)
DEVICES: tuple[str, ...] = get_args(Device)
ATTENTION_SWITCHES: tuple[str, ...] = get_args(AttentionSwitch)
CLASSIFIER_ROLES: tuple[str, ...] = get_args(ClassifierRole)

# Lin et al. 2024: a sampler must start at the last step T; "trailing" does for any
# number of steps. Provisional: a FID benchmark is to choose the default.
DEFAULT_SPACING: SpacingName = "trailing"
DEFAULT_GUIDANCE_FORM: GuidanceForm = "guided-diffusion"

# Classifier training epochs: reaches the 97% target on mnist-5k (benchmarks/classifier_accuracy.py).
DEFAULT_CLASSIFIER_EPOCHS = 6
# The pytorch-fid port of the FID Inception weights (inception.py).
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
