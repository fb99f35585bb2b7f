"""Guidance: classifier-free (eq. 6 of Ho & Salimans 2022: (1 + w) eps(x, y) - w eps(x, null))
and classifier guidance (Dhariwal & Nichol 2021; the conventions are in guidance.py)."""

import math

import pytest
import torch

from ddpmkit import ConfigError, linear_schedule
from ddpmkit.classifier import Classifier
from ddpmkit.guidance import GUIDANCE_FORMS, Denoised, make_classifier_guidance, make_denoiser
from ddpmkit.unet import NO_LABEL
from ddpmkit.samplers import sample, timestep_indices
from ddpmkit.unet import UNet


class ToyConditionalModel:
    """A label-dependent noise predictor that records each call's labels."""

    def __init__(self, null_label=10):
        self.null_label = null_label
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append(y.tolist())
        shift = (y.to(x.dtype) + 2).view(-1, 1, 1, 1) * (t.to(x.dtype) + 1).view(-1, 1, 1, 1) / 1000
        return torch.tanh(x) * 0.3 + shift


def test_guided_noise_is_eq_6_from_one_forward_pass():
    model, weight = ToyConditionalModel(), 2.5
    labels = torch.tensor([0, 3, 7])
    x, t = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 5, 5])
    guided = make_denoiser(model, labels, weight, schedule=linear_schedule(30))(x, t)
    assert model.calls == [[0, 3, 7, 10, 10, 10]]  # one pass: conditional half, then "no label"
    conditional = model(x, t, labels)
    unconditional = model(x, t, torch.full((3,), 10))
    torch.testing.assert_close(guided.eps, (1 + weight) * conditional - weight * unconditional)
    assert guided.variance_values is None


def test_models_without_null_label_get_minus_one():
    seen = []

    def model(x, t, y):
        seen.append(y.tolist())
        return torch.zeros_like(x)

    make_denoiser(model, torch.tensor([4, 5]), 1.0, schedule=linear_schedule(30))(torch.zeros(2, 1, 1, 1), torch.tensor([0, 0]))
    assert NO_LABEL == -1 and seen == [[4, 5, -1, -1]]


def test_weight_zero_is_plain_conditional_sampling_exactly():
    schedule, labels = linear_schedule(50), torch.tensor([1, 2])
    model = ToyConditionalModel()
    plain = sample(lambda x, t: model(x, t, labels), schedule, (2, 1, 3, 3), steps=8,
                   generator=torch.Generator().manual_seed(3))
    model.calls.clear()
    guided = sample(model, schedule, (2, 1, 3, 3), steps=8, labels=labels, guidance_scale=0.0,
                    generator=torch.Generator().manual_seed(3))
    assert torch.equal(guided, plain)
    assert model.calls == [[1, 2]] * 8  # no unconditional pass


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver++", "dpm-solver++-sde"])
def test_guided_sampling_uses_eq_6_with_one_forward_pass_per_step(sampler):
    schedule, labels, weight = linear_schedule(50), torch.tensor([1, 2]), 3.0
    model = ToyConditionalModel()
    null = torch.full((2,), model.null_label)
    combined = sample(lambda x, t: (1 + weight) * model(x, t, labels) - weight * model(x, t, null), schedule,
                      (2, 1, 3, 3), sampler=sampler, steps=7, generator=torch.Generator().manual_seed(4))
    model.calls.clear()
    guided = sample(model, schedule, (2, 1, 3, 3), sampler=sampler, steps=7, labels=labels,
                    guidance_scale=weight, generator=torch.Generator().manual_seed(4))
    assert model.calls == [[1, 2, 10, 10]] * 7
    torch.testing.assert_close(guided, combined)
    assert not torch.allclose(guided, sample(lambda x, t: model(x, t, labels), schedule, (2, 1, 3, 3),
                                             sampler=sampler, steps=7, generator=torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_classifier_free_guidance_of_an_x0_or_v_model_is_that_of_its_noise_predictor(prediction):
    # A model of x0 or v gets the same guided samples as the noise predictor it implies: eq. 6
    # combines the two predictions after each is turned into eps (guidance.py); the same as
    # combining x0s or vs, since the conversions are affine and eq. 6's weights sum to 1.
    schedule, labels, weight = linear_schedule(50), torch.tensor([1, 2]), 3.0
    eps_model = ToyConditionalModel()

    def target_model(x, t, y):
        eps = eps_model(x, t, y)
        abar = schedule.alpha_bars[t].to(x.dtype).view(-1, 1, 1, 1)
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        return x0 if prediction == "x0" else abar.sqrt() * eps - (1 - abar).sqrt() * x0

    target_model.null_label = eps_model.null_label
    runs = [sample(model, schedule, (2, 1, 3, 3), steps=7, labels=labels, guidance_scale=weight, prediction=name,
                   dtype=torch.float64, generator=torch.Generator().manual_seed(4))
            for model, name in ((eps_model, "eps"), (target_model, prediction))]
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("labels, scale, model, message", [
    (torch.tensor([0]), -0.5, ToyConditionalModel(), ">= 0"),
    (torch.tensor([0]), float("nan"), ToyConditionalModel(), ">= 0"),
    (None, 1.0, ToyConditionalModel(), "needs labels"),
    (torch.tensor([0]), 1.0, ToyConditionalModel(null_label=None), "conditional model"),
])
def test_invalid_guidance_raises_config_error(labels, scale, model, message):
    with pytest.raises(ConfigError, match=message):
        make_denoiser(model, labels, scale, schedule=linear_schedule(30))


# --- classifier guidance (Dhariwal & Nichol 2021) ----------------------------------------------
#
# The analytic stand-in: every pixel of x0 is N(MEANS[y], STD^2) given its class y, the two
# classes equally likely. Then x_t | y ~ N(sqrt(abar) MEANS[y], v) per pixel, with
# v = abar STD^2 + 1 - abar, and everything guidance needs is known in closed form:
# p(y | x_t), its gradient, and the exact noise predictors E[eps | x_t, y] and E[eps | x_t].

MEANS, STD = (-0.3, 0.3), 0.5


def noise_level(schedule, x, t):
    """abar at indices t shaped (B, 1, 1, 1) in x's dtype; abar = 1 (clean images) without a schedule."""
    if schedule is None:
        return torch.ones(len(x), 1, 1, 1, dtype=x.dtype)
    return schedule.alpha_bars[t].to(x.dtype).view(-1, 1, 1, 1)


class MixtureClassifier:
    """The exact posterior p(y | x_t) of the mixture; without a schedule, of clean images (no t)."""

    def __init__(self, schedule=None):
        self.schedule = schedule

    def __call__(self, x, t=None):
        assert (t is None) == (self.schedule is None), "called with(out) t against its kind"
        abar = noise_level(self.schedule, x, t)
        variance = abar * STD**2 + 1 - abar
        return torch.stack([-((x - abar.sqrt() * mean) ** 2).flatten(1).sum(1) / (2 * variance.flatten()) for mean in MEANS], 1)

    def gradient(self, x, t, labels):
        """grad_x log p(y | x_t) = sqrt(abar) (MEANS[y] - E_p[MEANS]) / v on every pixel."""
        abar = noise_level(self.schedule, x, t)
        means = torch.tensor(MEANS, dtype=x.dtype)
        expected_mean = torch.softmax(self(x, t), dim=1) @ means
        return (abar.sqrt() * (means[labels] - expected_mean).view(-1, 1, 1, 1) / (abar * STD**2 + 1 - abar)).expand_as(x)


class MixtureModel:
    """The exact noise predictor E[eps | x_t, y] of the mixture; label 2 ("no label") gives E[eps | x_t]."""

    null_label = 2

    def __init__(self, schedule):
        self.schedule, self.classifier = schedule, MixtureClassifier(schedule)

    def __call__(self, x, t, y):
        abar = noise_level(self.schedule, x, t)
        per_class = [(1 - abar).sqrt() * (x - abar.sqrt() * mean) / (abar * STD**2 + 1 - abar) for mean in MEANS]
        probabilities = torch.softmax(self.classifier(x, t), dim=1).view(-1, 2, 1, 1, 1)
        unconditional = probabilities[:, 0] * per_class[0] + probabilities[:, 1] * per_class[1]
        conditional = torch.where((y == 0).view(-1, 1, 1, 1), per_class[0], per_class[1])
        return torch.where((y == self.null_label).view(-1, 1, 1, 1), unconditional, conditional)


class UnconditionalMixtureModel:
    """E[eps | x_t] alone: a model that takes no labels (null_label None, as an unconditional UNet)."""

    null_label = None

    def __init__(self, schedule):
        self.model = MixtureModel(schedule)

    def __call__(self, x, t):
        return self.model(x, t, torch.full_like(t, MixtureModel.null_label))


SCHEDULE = linear_schedule(1000)
LABELS = torch.tensor([0, 1, 1, 0, 1, 0])
SHAPE = (6, 1, 2, 2)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kwargs", [
    {"sampler": "ddim"}, {"sampler": "ddim", "eta": 0.5}, {"sampler": "dpm-solver++"}, {"sampler": "dpm-solver++-sde"},
], ids=str)
def test_guiding_by_the_exact_classifier_turns_the_unconditional_model_into_the_conditional_one(kwargs):
    # Bayes: grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t), and eps = -sqrt(1 - abar)
    # grad log p, so eps^ = eps - sqrt(1 - abar_t) * 1 * g is exactly E[eps | x_t, y]. This fixes
    # the sign, the sqrt(1 - abar_t) factor, the original index t (10 of 1000 steps) and x_t.
    common = dict(steps=10, clip_denoised=False, dtype=torch.float64, **kwargs)
    guided = sample(UnconditionalMixtureModel(SCHEDULE), SCHEDULE, SHAPE, labels=LABELS,
                    classifier=MixtureClassifier(SCHEDULE), classifier_scale=1.0, generator=seeded(), **common)
    conditional = sample(MixtureModel(SCHEDULE), SCHEDULE, SHAPE, labels=LABELS, generator=seeded(), **common)
    torch.testing.assert_close(guided, conditional, rtol=1e-9, atol=1e-9)
    unguided = sample(UnconditionalMixtureModel(SCHEDULE), SCHEDULE, SHAPE, generator=seeded(), **common)
    assert (guided - unguided).abs().max() > 0.1


def test_guided_noise_is_algorithm_2_and_the_poster_form_has_no_sqrt_factor():
    x = torch.randn(4, 1, 2, 2, generator=seeded(1), dtype=torch.float64)
    t, labels, scale = torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 1, 0]), 2.5
    sqrt_one_minus_abar = (1 - SCHEDULE.alpha_bars[t]).sqrt().view(-1, 1, 1, 1)  # 0.01 at t = 0

    def eps(x_t, t):
        return torch.sin(x_t) * (t.view(-1, 1, 1, 1) + 1) / 1000

    values = torch.full_like(x, 0.25)
    denoiser = lambda x_t, t: Denoised(eps(x_t, t), values)  # noqa: E731
    noisy, clean = MixtureClassifier(SCHEDULE), MixtureClassifier()
    guided = make_classifier_guidance(noisy, labels, scale).guide(denoiser, SCHEDULE)(x, t)
    torch.testing.assert_close(guided.eps, eps(x, t) - sqrt_one_minus_abar * scale * noisy.gradient(x, t, labels))
    poster = make_classifier_guidance(clean, labels, scale, "poster").guide(denoiser, SCHEDULE)(x, t)
    torch.testing.assert_close(poster.eps, eps(x, t) - scale * clean.gradient(x, None, labels))
    assert guided.variance_values is values and poster.variance_values is values  # guidance leaves the variance


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ancestral_sampling_shifts_the_mean_by_scale_sigma_squared_gradient(variance):
    # Algorithm 1 of Dhariwal & Nichol on the respaced schedule, written out here: x_{t-1} =
    # mu + s Sigma g(x_t) + sigma z, on every step, the last (noiseless) one included.
    from test_samplers import noise_draws

    schedule, scale = linear_schedule(100), 2.0
    model, classifier = UnconditionalMixtureModel(schedule), MixtureClassifier(schedule)
    visited = timestep_indices(100, 8, "uniform").tolist()
    alpha_bars = [schedule.alpha_bars[i].item() for i in visited] + [1.0]
    x, *zs = noise_draws(3, SHAPE, 8)
    for n, index in enumerate(visited):
        abar, abar_prev = alpha_bars[n], alpha_bars[n + 1]
        beta = 1 - abar / abar_prev
        sigma_squared = beta if variance == "beta" else (1 - abar_prev) / (1 - abar) * beta
        t = torch.full((len(x),), index)
        mean = (x - beta / math.sqrt(1 - abar) * model(x, t)) / math.sqrt(1 - beta)
        x_next = mean + sigma_squared * scale * classifier.gradient(x, t, LABELS)
        x = x_next + math.sqrt(sigma_squared) * zs[n] if n < len(visited) - 1 else x_next
    got = sample(model, schedule, SHAPE, steps=8, spacing="uniform", variance=variance, labels=LABELS,
                 classifier=classifier, classifier_scale=scale, clip_denoised=False, dtype=torch.float64,
                 generator=seeded(3))
    torch.testing.assert_close(got, x, rtol=1e-9, atol=1e-9)


def test_poster_form_guides_ancestral_sampling_through_the_noise():
    # The poster's eps' = eps - s g replaces eps in Algorithm 2 of Ho et al.: the same as
    # sampling a model that returns eps' (no mean shift).
    model, clean, scale = UnconditionalMixtureModel(SCHEDULE), MixtureClassifier(), 0.8
    common = dict(steps=6, clip_denoised=False, dtype=torch.float64)
    guided = sample(model, SCHEDULE, SHAPE, labels=LABELS, classifier=clean, classifier_scale=scale,
                    guidance_form="poster", generator=seeded(), **common)
    by_hand = sample(lambda x, t: model(x, t) - scale * clean.gradient(x, None, LABELS), SCHEDULE, SHAPE,
                     generator=seeded(), **common)
    torch.testing.assert_close(guided, by_hand, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kwargs", [{"sampler": "ddpm"}, {"sampler": "ddim", "eta": 0.5}, {"sampler": "dpm-solver++"}],
                         ids=lambda k: k["sampler"])
@pytest.mark.parametrize("form", GUIDANCE_FORMS)
def test_scale_zero_is_unguided_sampling_exactly(kwargs, form):
    def never_called(*args):
        raise AssertionError("scale 0 must not call the classifier")

    guidance = dict(classifier=never_called, classifier_scale=0.0, guidance_form=form)
    unconditional = UnconditionalMixtureModel(SCHEDULE)
    assert torch.equal(
        sample(unconditional, SCHEDULE, SHAPE, steps=5, labels=LABELS, generator=seeded(), **guidance, **kwargs),
        sample(unconditional, SCHEDULE, SHAPE, steps=5, generator=seeded(), **kwargs),
    )
    conditional = ToyConditionalModel()
    assert torch.equal(
        sample(conditional, SCHEDULE, SHAPE, steps=5, labels=LABELS, generator=seeded(), **guidance, **kwargs),
        sample(conditional, SCHEDULE, SHAPE, steps=5, labels=LABELS, generator=seeded(), **kwargs),
    )


def test_both_kinds_of_guidance_at_once():
    # eps^ = [(1 + w) eps(x_t, y) - w eps(x_t, null)] - sqrt(1 - abar_t) s g: eq. 6 first.
    model, classifier, weight, scale = MixtureModel(SCHEDULE), MixtureClassifier(SCHEDULE), 1.5, 0.7
    null = torch.full_like(LABELS, model.null_label)

    def by_hand(x, t):
        classifier_free = (1 + weight) * model(x, t, LABELS) - weight * model(x, t, null)
        return classifier_free - (1 - SCHEDULE.alpha_bars[t]).sqrt().view(-1, 1, 1, 1) * scale * classifier.gradient(x, t, LABELS)

    common = dict(sampler="ddim", steps=6, clip_denoised=False, dtype=torch.float64)
    guided = sample(model, SCHEDULE, SHAPE, labels=LABELS, guidance_scale=weight, classifier=classifier,
                    classifier_scale=scale, generator=seeded(), **common)
    torch.testing.assert_close(guided, sample(by_hand, SCHEDULE, SHAPE, generator=seeded(), **common),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver++", "dpm-solver++-sde"])
@pytest.mark.parametrize("form, scales", [("guided-diffusion", [0.0, 1.0, 4.0]), ("poster", [0.0, 0.5, 2.0])])
def test_guidance_raises_the_probability_of_the_target_class(sampler, form, scales):
    judge = MixtureClassifier()  # the exact posterior of clean images
    classifier = MixtureClassifier(SCHEDULE) if form == "guided-diffusion" else judge
    labels = torch.arange(400) % 2
    probabilities = []
    for scale in scales:
        x0 = sample(UnconditionalMixtureModel(SCHEDULE), SCHEDULE, (400, 1, 2, 2), sampler=sampler, steps=10,
                    labels=labels, classifier=classifier, classifier_scale=scale, guidance_form=form,
                    generator=seeded())
        probabilities.append(torch.softmax(judge(x0), dim=1).gather(1, labels[:, None]).mean().item())
    assert abs(probabilities[0] - 0.5) < 0.05, probabilities  # unguided: the classes are equally likely
    assert probabilities == sorted(probabilities) and probabilities[-1] > 0.9, probabilities


def test_the_gradient_of_a_ddpmkit_classifier_under_inference_mode():
    torch.manual_seed(0)
    classifier = Classifier(1, 8, num_classes=3, width=4, time_conditioned=True).eval()
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([3, 40]), torch.tensor([2, 0])
    x_copy = x.clone().requires_grad_()
    log_probabilities = torch.log_softmax(classifier(x_copy, t), dim=1)[torch.arange(2), labels]
    (expected,) = torch.autograd.grad(log_probabilities.sum(), x_copy)
    with torch.inference_mode():  # as inside a sampler: every input an inference tensor
        guidance = make_classifier_guidance(classifier, labels.clone(), 1.5)
        got = guidance.scaled_gradient(x.clone(), t.clone())
    torch.testing.assert_close(got, 1.5 * expected)
    assert all(parameter.grad is None for parameter in classifier.parameters())


@pytest.mark.parametrize("num_classes, guidance_scale", [(None, 0.0), (3, 0.0), (3, 2.0)])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_ddpmkit_classifier_guides_a_unet_towards_the_class(num_classes, guidance_scale, sampler):
    # An unconditional UNet raises if it is given labels; a conditional one gets them. The
    # samples move to where the (random) classifier finds their class more likely.
    torch.manual_seed(0)
    classifier = Classifier(1, 8, num_classes=3, width=4, time_conditioned=True).eval()
    unet = UNet(base_channels=8, channel_mults=(1,), num_res_blocks=1, num_classes=num_classes).eval().requires_grad_(False)
    schedule, labels = linear_schedule(50), torch.tensor([2, 0, 1, 2, 0, 1, 1, 0])
    common = dict(sampler=sampler, steps=3, labels=labels if num_classes else None, guidance_scale=guidance_scale)
    unguided = sample(unet, schedule, (8, 1, 8, 8), generator=seeded(), **common)
    guided = sample(unet, schedule, (8, 1, 8, 8), generator=seeded(), **{**common, "labels": labels},
                    classifier=classifier, classifier_scale=50.0)
    assert not guided.requires_grad and all(parameter.grad is None for parameter in classifier.parameters())

    def log_probability(x0):  # of the target class, at the first step index
        with torch.no_grad():
            return torch.log_softmax(classifier(x0.clone(), torch.zeros(8, dtype=torch.int64)), dim=1)[torch.arange(8), labels]

    # Measured: +0.064 (ddpm) and +0.031 (ddim) on average; with the gradient's sign flipped, negative.
    assert (log_probability(guided) - log_probability(unguided)).mean() > 0.01


def unconditional_toy(x, t):
    return 0.1 * x


unconditional_toy.null_label = None


@pytest.mark.parametrize("model, kwargs, message", [
    (ToyConditionalModel(), {"classifier": MixtureClassifier(SCHEDULE)}, "needs labels"),
    (ToyConditionalModel(), {"labels": LABELS, "classifier_scale": 1.0}, "needs a classifier"),
    (ToyConditionalModel(), {"labels": LABELS, "classifier": MixtureClassifier(SCHEDULE), "classifier_scale": -1.0},
     "classifier_scale"),
    (ToyConditionalModel(), {"labels": LABELS, "classifier": MixtureClassifier(SCHEDULE),
                             "classifier_scale": float("nan")}, "classifier_scale"),
    (ToyConditionalModel(), {"labels": LABELS, "classifier": MixtureClassifier(SCHEDULE),
                             "classifier_scale": float("inf")}, "classifier_scale"),
    (ToyConditionalModel(), {"labels": LABELS, "classifier": MixtureClassifier(SCHEDULE), "guidance_form": "dhariwal"},
     "guidance_form"),
    (unconditional_toy, {"labels": LABELS}, "unconditional"),
    (unconditional_toy, {"labels": LABELS, "guidance_scale": 1.0, "classifier": MixtureClassifier(SCHEDULE)},
     "classifier-free guidance"),
    (unconditional_toy, {"labels": torch.tensor([0, 1, 2, 0, 1, 0]), "classifier": MixtureClassifier(SCHEDULE),
                         "classifier_scale": 1.0}, "classes of the guiding classifier"),
    (unconditional_toy, {"labels": LABELS, "classifier": Classifier(1, 8, 2, width=4, time_conditioned=True),
                         "classifier_scale": 1.0, "guidance_form": "poster"}, "time-conditioned"),
    (unconditional_toy, {"labels": LABELS, "classifier": Classifier(1, 8, 2, width=4), "classifier_scale": 1.0},
     "clean images"),
])
def test_invalid_classifier_guidance_raises_config_error(model, kwargs, message):
    with pytest.raises(ConfigError, match=message) as error:
        sample(model, SCHEDULE, SHAPE, steps=2, **kwargs)
    assert "\n" not in str(error.value)
