"""The denoiser a sampler calls: classifier-free guidance (Ho & Salimans 2022) and
classifier guidance (Dhariwal & Nichol 2021). Every guidance convention of ddpmkit is here.

A *denoiser* is a function ``(x_t, t) -> Denoised``: the predicted noise at original step
indices ``t`` (int64, shape (B,); see schedules.py for the index convention), and, for a
model that learns its variance, its variance values (eq. 15 of Improved DDPM, see
schedules.interpolate_log_variance). Every sampler in samplers.py calls only a denoiser,
never the model, so what a sampler sees does not depend on how the noise prediction was
made. This is also the one place where a model's output is read (``make_denoiser``): a
model that predicts x0 or v (``prediction``) has its output turned into eps here
(schedules.py's conversions), and a learned-variance model's output is split into the
prediction and the variance values (objectives.split_model_output). Everything after
(guidance, clipping, every sampler, the callback) sees eps. The one exception is ancestral
DDPM under classifier guidance, which shifts its mean instead (see below): which of the
two a sampler gets is decided here, by ``ClassifierGuidance.apply``, not by the sampler.

Who receives the labels. ``labels`` (int64, one per sample) are the classes to generate.
A conditional model is called as ``model(x_t, t, labels)``; an unconditional model as
``model(x_t, t)`` and never sees them: they then serve the guiding classifier only. A
model says it is unconditional with ``null_label = None`` (as UNet does without
``num_classes``); a model without a ``null_label`` attribute (a plain function) counts
as conditional. Labels for an unconditional model without a classifier are an error.

Classifier-free guidance (eq. 6 of Ho & Salimans):

    eps~(x_t, y) = (1 + w) eps(x_t, y) - w eps(x_t, null)

with guidance weight ``w = guidance_scale >= 0``, combined in eps space: a model that
predicts x0 or v has both of its predictions turned into eps first (the same as combining
the x0s or vs: the conversions are affine in the prediction and eq. 6's weights sum to 1). A learned variance is
the conditional prediction's (as GLIDE's sampling code takes it). ``w = 0`` is plain conditional sampling
and is computed as exactly that (no unconditional pass at all). diffusers and the
Stable Diffusion literature write the same combination as
``eps(null) + s (eps(y) - eps(null))``, so their ``guidance_scale`` s equals ``1 + w`` here:
our ``guidance_scale=2`` is their 3, and their "guidance off" (s = 1) is our 0.

The conditional and unconditional predictions come from ONE forward pass over the
batch concatenated with itself, the second half labelled "no label": ``model.null_label``
when the model has that attribute, otherwise unet.NO_LABEL (-1, which the UNet maps to
its "no label" slot too).

Classifier guidance, with scale ``s = classifier_scale >= 0`` and the gradient

    g = grad_{x_t} log p(y | x_t, t) = grad_{x_t} log_softmax(classifier(x_t, t))[y].

Signs: g points to where the classifier finds class y more likely; eps estimates
-sqrt(1 - abar_t) times the score grad log p(x_t), so *subtracting* a multiple of g from
eps, or *adding* one to the mean, moves samples towards class y. Two forms
(``guidance_form``):

* "guided-diffusion" (default; Dhariwal & Nichol and their code). The classifier is
  time-conditioned, trained on x_t (classifier.py, ``noisy=True``), and called as
  ``classifier(x_t, t)`` with the original index t. Ancestral DDPM (their Algorithm 1,
  section 4.1) samples x_{t-1} ~ N(mu + s Sigma g, Sigma): the mean shifted by s Sigma g,
  Sigma being the step's variance sigma_t^2 (beta_t or beta-tilde_t, of the respaced
  schedule when steps are skipped), at every step including the last, noiseless one.
  DDIM and DPM-Solver++ (their Algorithm 2, section 4.2) use
  ``eps^ = eps - sqrt(1 - abar_t) s g``, i.e. the score of p(x_t) p(y | x_t)^s.
* "poster": ``eps' = eps - s g`` for every sampler (ancestral DDPM included, as Algorithm 2
  of Ho et al. run on eps'), with no sqrt(1 - abar_t) factor, and a classifier trained
  on clean images, called as ``classifier(x_t)`` without t. It equals the first form with
  scale s / sqrt(1 - abar_t), so it pushes harder as the noise shrinks; typical s = 200.

Where the gradient is taken: once per model evaluation, at the sampler's current x_t
(before that step's update, the x_t the model sees) and the original index t, on the
noisy sample itself, not on the predicted x0; as guided-diffusion's ``cond_fn(x, t)``.
With classifier-free guidance as well, eps above is the combined eps~ of eq. 6.
``s = 0`` never calls the classifier, so it is unguided sampling bit for bit.

Deviation from guided-diffusion, with ``clip_denoised``: it clips the unguided x0, then
guides, and leaves the guided x0 unclipped (DDIM). Here guidance acts on the model's eps
before the sampler predicts x0 from it, so the x0 that is clipped is the guided one and
clipping keeps its promise of x0 in [-1, 1]. Without clipping the two are the same. The
ancestral mean shift is applied after clipping, as in guided-diffusion.

The gradient needs autograd inside samplers that run under ``torch.inference_mode``: it
is switched back on around the classifier call only, on a detached copy of x_t, and
``torch.autograd.grad`` takes the gradient with respect to that copy alone (nothing
accumulates in the classifier's ``.grad``). The per-sample gradients come from one
backward pass of the batch's summed log-probabilities, which needs a classifier that
treats the samples of a batch independently (true in eval mode).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from .choices import DEFAULT_GUIDANCE_FORM, GUIDANCE_FORMS, PREDICTION_NAMES, GuidanceForm, PredictionName
from .errors import ConfigError
from .objectives import split_model_output
from .schedules import NoiseSchedule, _gather
from .unet import NO_LABEL
from .validation import check_choice


class Denoised(NamedTuple):
    """What a denoiser predicts at (x_t, t): the noise, and a learned-variance model's
    variance values in [-1, 1] (None for a model with a fixed variance)."""

    eps: torch.Tensor
    variance_values: torch.Tensor | None


Denoiser = Callable[[torch.Tensor, torch.Tensor], Denoised]
"""(x_t, t) -> Denoised, with t the int64 original step indices of shape (B,)."""

GradientField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x_t, t) -> s grad_{x_t} log p(y | x_t, t), the scaled classifier gradient."""


def is_conditional(model: Callable[..., torch.Tensor]) -> bool:
    """Whether ``model`` takes labels: False only for a model whose ``null_label`` is None."""
    return getattr(model, "null_label", NO_LABEL) is not None


def labels_for_model(
    model: Callable[..., torch.Tensor], labels: torch.Tensor | None, classifier_guided: bool
) -> torch.Tensor | None:
    """The labels ``model`` is called with: the target labels if it is conditional, else none."""
    if labels is None or is_conditional(model):
        return labels
    if not classifier_guided:
        raise ConfigError("labels were given, but the model is unconditional; they need a classifier to guide with")
    return None


def make_denoiser(
    model: Callable[..., torch.Tensor],
    labels: torch.Tensor | None = None,
    guidance_scale: float = 0.0,
    *,
    schedule: NoiseSchedule,
    prediction: PredictionName = "eps",
    learned_variance: bool = False,
) -> Denoiser:
    """The denoiser for ``model``: unconditional, conditional on ``labels``, or guided.

    ``model`` is called as ``model(x_t, t)`` without labels and ``model(x_t, t, y)`` with
    them; ``labels`` is an int64 tensor with one label per sample of the batch. Its output
    is read as ``prediction`` (eps, x0 or v, converted to eps with ``schedule``, the one the
    model was trained on) and, with ``learned_variance``, as twice the image's channels,
    the second half the variance values.
    """
    check_choice("prediction", prediction, PREDICTION_NAMES)
    if not guidance_scale >= 0:  # also rejects NaN
        raise ConfigError(f"guidance_scale must be >= 0, got {guidance_scale}")

    def read(output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> Denoised:
        predicted, variance_values = split_model_output(output, x_t.shape[1], learned_variance)
        return Denoised(schedule.predict_eps(prediction, x_t, t, predicted), variance_values)

    if labels is None:
        if guidance_scale > 0:
            raise ConfigError("classifier-free guidance (guidance_scale > 0) needs labels and a conditional model")
        return lambda x_t, t: read(model(x_t, t), x_t, t)
    if guidance_scale == 0:
        # w = 0 in eq. 6 is the conditional prediction itself; skipping the unconditional
        # pass makes this exactly (bit for bit) plain conditional sampling.
        return lambda x_t, t: read(model(x_t, t, labels), x_t, t)
    return _classifier_free(model, labels, float(guidance_scale), read)


def _classifier_free(
    model: Callable[..., torch.Tensor], labels: torch.Tensor, weight: float, read: Callable[..., Denoised]
) -> Denoiser:
    null_label = getattr(model, "null_label", NO_LABEL)
    if null_label is None:
        raise ConfigError("classifier-free guidance needs a conditional model; this one has no label embedding")
    # Built once per sampling run: the first half keeps the labels, the second is "no label".
    both_labels = torch.cat([labels, torch.full_like(labels, null_label)])

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> Denoised:
        output_conditional, output_unconditional = model(torch.cat([x_t, x_t]), torch.cat([t, t]), both_labels).chunk(2)
        conditional, unconditional = read(output_conditional, x_t, t), read(output_unconditional, x_t, t)
        return conditional._replace(eps=(1.0 + weight) * conditional.eps - weight * unconditional.eps)  # eq. 6

    return guided


# --- classifier guidance -----------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ClassifierGuidance:
    """Classifier guidance towards ``labels`` with scale ``scale > 0`` in form ``form``
    (module docstring). Built by ``make_classifier_guidance``, which checks its arguments."""

    classifier: Callable[..., torch.Tensor]
    labels: torch.Tensor
    scale: float
    form: GuidanceForm

    def scaled_gradient(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """s grad_{x_t} log p(y | x_t, t) at x_t (without t in the "poster" form)."""
        # inference_mode(False): enable_grad alone does not lift inference mode. x_t, t and
        # the labels may be inference tensors, which autograd cannot save: clone them.
        with torch.inference_mode(False), torch.enable_grad():
            x = x_t.detach().clone().requires_grad_()
            logits = self.classifier(x, t.clone()) if self.form == "guided-diffusion" else self.classifier(x)
            labels = self.labels.clone()
            if not bool(((labels >= 0) & (labels < logits.shape[1])).all()):
                raise ConfigError(f"labels must be classes of the guiding classifier, 0 .. {logits.shape[1] - 1}")
            log_probs = torch.log_softmax(logits, dim=1).gather(1, labels[:, None])
            (gradient,) = torch.autograd.grad(log_probs.sum(), x)
        return self.scale * gradient

    def guide(self, denoiser: Denoiser, schedule: NoiseSchedule) -> Denoiser:
        """The denoiser of eps^ = eps - sqrt(1 - abar_t) s g, or eps' = eps - s g ("poster")."""
        noise_scales = (1.0 - schedule.alpha_bars).sqrt()  # of the original schedule: t is an original index

        def guided(x_t: torch.Tensor, t: torch.Tensor) -> Denoised:
            denoised = denoiser(x_t, t)
            gradient = self.scaled_gradient(x_t, t)
            if self.form == "guided-diffusion":
                gradient = _gather(noise_scales, t, x_t) * gradient
            return denoised._replace(eps=denoised.eps - gradient)

        return guided

    def apply(self, denoiser: Denoiser, schedule: NoiseSchedule, *, ancestral: bool) -> tuple[Denoiser, GradientField | None]:
        """The guided (denoiser, mean shift) for a sampler: ancestral DDPM in the
        "guided-diffusion" form keeps its denoiser and shifts its mean by Sigma s g
        (Algorithm 1 of Dhariwal & Nichol); every other case guides the denoiser
        (their Algorithm 2, or the poster's eps') and has no mean shift."""
        check_classifier_schedule(self.classifier, schedule)
        if ancestral and self.form == "guided-diffusion":
            return denoiser, self.scaled_gradient
        return self.guide(denoiser, schedule), None


def make_classifier_guidance(
    classifier: Callable[..., torch.Tensor] | None,
    labels: torch.Tensor | None,
    scale: float,
    form: GuidanceForm = DEFAULT_GUIDANCE_FORM,
) -> ClassifierGuidance | None:
    """Classifier guidance, or None when there is none to do (no classifier, or scale 0:
    then the classifier is never called, and sampling is unguided bit for bit).

    ``classifier(x_t, t)`` (``classifier(x_t)`` in the "poster" form) returns logits
    (B, num_classes); ``labels`` are the target classes, one per sample.
    """
    check_choice("guidance_form", form, GUIDANCE_FORMS)
    if not (scale >= 0 and math.isfinite(scale)):  # also rejects NaN
        raise ConfigError(f"classifier_scale must be finite and >= 0, got {scale}")
    if classifier is None:
        if scale > 0:
            raise ConfigError("classifier guidance (classifier_scale > 0) needs a classifier")
        return None
    if labels is None:
        raise ConfigError("classifier guidance needs labels: the classes to guide towards")
    check_time_conditioning(classifier, form)
    return ClassifierGuidance(classifier, labels, float(scale), form) if scale > 0 else None


def check_time_conditioning(classifier: Callable[..., torch.Tensor], form: GuidanceForm) -> None:
    """A classifier that says whether it is time-conditioned (a ``time_conditioned``
    attribute, as classifier.Classifier has) must match the form: time-conditioned for
    "guided-diffusion" only. A plain function is taken as it is."""
    time_conditioned = getattr(classifier, "time_conditioned", None)
    if time_conditioned is None or time_conditioned == (form == "guided-diffusion"):
        return
    if form == "poster":
        raise ConfigError("guidance_form 'poster' calls a classifier of clean images; this one is time-conditioned (noisy)")
    raise ConfigError("guidance_form 'guided-diffusion' needs a time-conditioned (noisy) classifier; this one is for clean images")


def check_classifier_schedule(classifier: Callable[..., torch.Tensor], schedule: NoiseSchedule) -> None:
    """A noisy classifier that says which schedule it was trained for (a
    ``trained_for_schedule`` record of NoiseSchedule.identity(), as classifier.Classifier
    has) must guide a model of that schedule: for any other it would see x_t at the wrong
    noise level for each t (cosine against linear: 4x the SNR at t = 99, 90x at t = 900).
    A classifier without the record (a plain function, a clean classifier) is taken as it is."""
    trained_for = getattr(classifier, "trained_for_schedule", None)
    if trained_for is None or trained_for["betas_sha256"] == schedule.identity()["betas_sha256"]:
        return
    raise ConfigError(
        f"the guiding classifier was trained for the {describe_schedule(trained_for)}, but the model samples with the "
        f"{describe_schedule(schedule.identity())}; train one for it: ddpm train-classifier --noisy --for RUN"
    )


def describe_schedule(identity: dict[str, Any]) -> str:
    """'linear schedule, T = 1000 (betas f4fb21d432a5)' for a NoiseSchedule.identity() record."""
    return f"{identity['name']} schedule, T = {identity['num_steps']} (betas {identity['betas_sha256'][:12]})"


# --- which classes to generate: shared by ``ddpm sample`` and sweeps ----------------------------

def class_labels(classes: Sequence[int], per_class: int) -> torch.Tensor:
    """int64 labels: ``per_class`` of the first class, then of the next (one grid row per class)."""
    return torch.tensor(list(classes), dtype=torch.int64).repeat_interleave(per_class)


def num_guided_classes(model: Any, classifier: Any | None) -> int:
    """How many classes labels may name: the conditional UNet's, else the guiding classifier's."""
    if is_conditional(model):
        return model.config.num_classes
    if classifier is not None:
        return classifier.config.num_classes
    raise ConfigError("class labels need a conditional model (trained with --conditional) or classifier guidance")


def resolve_classes(classes: Sequence[int] | Literal["all"], num_classes: int) -> list[int]:
    """``classes`` checked to lie in 0 .. num_classes - 1; "all" is every class."""
    if classes == "all":
        return list(range(num_classes))
    outside = [c for c in classes if not 0 <= c < num_classes]
    if outside:
        raise ConfigError(f"class(es) {outside or '(none)'} out of range: the classes are 0 .. {num_classes - 1}")
    return list(classes)


def check_classifier_free(model: Callable[..., torch.Tensor], guidance_scale: float, label_dropout: float) -> None:
    """Classifier-free guidance (w > 0) needs a conditional model trained with label dropout
    (``label_dropout`` > 0, its training config's): without, the "no label" embedding that
    eq. 6 subtracts was never trained and is still its random initial value. Say so up front."""
    if guidance_scale <= 0:
        return
    if not is_conditional(model):
        raise ConfigError("classifier-free guidance needs a conditional model (trained with --conditional); this one is unconditional")
    if not label_dropout > 0:
        raise ConfigError(
            "classifier-free guidance needs a model trained with label dropout (--label-dropout 0.1, say); this one had 0, "
            "so its 'no label' embedding is untrained; sample it with --guidance 0 (plain conditional sampling)"
        )
