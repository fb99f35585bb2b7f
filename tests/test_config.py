"""TrainConfig: validation, TOML files, command-line precedence."""

import json

import pytest

from ddpmkit import ConfigError
from ddpmkit.config import TrainConfig, config_from_dict, field_names, model_output_options, resolve_config


def test_defaults_are_the_posters_mnist_setting():
    config = TrainConfig()
    assert (config.dataset, config.schedule, config.num_steps, config.lr, config.epochs) == ("mnist", "linear", 1000, 1e-4, 30)
    assert config.channel_mults == (1, 2, 2) and config.num_res_blocks == 2 and config.base_channels == 64


def test_json_round_trip():
    config = TrainConfig(dataset="cifar10", attention_levels=(1,), schedule="cosine", epochs=60)
    again = config_from_dict(json.loads(config.to_json()))
    assert again == config


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lr": 0}, "lr must be > 0"),
        ({"lr": -1e-4}, "lr must be > 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"num_steps": 0}, "num_steps must be >= 1"),
        ({"attention_levels": [3]}, "out of range: the model has levels 0..2"),
        ({"schedule": "quadratic"}, "schedule must be one of 'linear', 'cosine'"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"epochs": "ten"}, "epochs must be an integer"),
        ({"lr": "fast"}, "lr must be a number"),
        ({"conditional": 1}, "conditional must be true or false"),
        ({"channel_mults": "1,2"}, "channel_mults must be a list of integers"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"preview_steps": 2000}, "preview_steps must be in [1, num_steps=1000]"),
        ({"batch": 64}, "unknown key(s) batch; valid keys: dataset,"),
        ({"prediction": "score"}, "prediction must be one of 'eps', 'x0', 'v', got 'score'"),
        ({"loss_weighting": "snr"}, "loss_weighting must be one of 'none', 'min-snr'"),
        ({"min_snr_gamma": 0}, "min_snr_gamma must be > 0, got 0.0"),
        ({"min_snr_gamma": -5}, "min_snr_gamma must be > 0"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
        ({"learn_variance": "yes"}, "learn_variance must be true or false"),
        ({"random_flip": 1}, "random_flip must be true or false"),
    ],
)
def test_invalid_values_name_the_problem(values, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(values)
    assert message in str(info.value)


def test_a_config_written_before_the_objective_keys_loads_as_that_days_training():
    # config.json of a run from before prediction, learn_variance, loss_weighting, min_snr_gamma,
    # warmup_steps and random_flip existed: eps prediction, fixed variances, plain MSE, no
    # warm-up, no flips.
    old = TrainConfig(dataset="mnist-5k", epochs=3).to_dict()
    for key in ("prediction", "learn_variance", "loss_weighting", "min_snr_gamma", "warmup_steps", "random_flip"):
        del old[key]
    config = config_from_dict(old)
    assert (config.prediction, config.learn_variance, config.loss_weighting, config.warmup_steps, config.random_flip) == (
        "eps", False, "none", 0, False)
    assert model_output_options(config) == {"prediction": "eps", "variance": "beta"}


def test_model_output_options_follow_the_model():
    learned = TrainConfig(prediction="v", learn_variance=True)
    assert model_output_options(learned) == {"prediction": "v", "variance": "learned"}
    assert model_output_options(TrainConfig(), "posterior") == {"prediction": "eps", "variance": "posterior"}
    with pytest.raises(ConfigError, match="learns its variance"):
        model_output_options(learned, "beta")
    with pytest.raises(ConfigError, match="needs a model trained with learn_variance"):
        model_output_options(TrainConfig(), "learned")


def test_unknown_key_error_lists_every_valid_key():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"learning_rate": 1e-3})
    assert all(name in str(info.value) for name in field_names())


def test_toml_file_then_command_line_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('dataset = "cifar10"\nepochs = 60\nattention_levels = [1]\nlr = 2e-4\n')
    config = resolve_config(path, {"lr": 1e-3, "epochs": None})
    assert config.dataset == "cifar10" and config.attention_levels == (1,)
    assert config.epochs == 60  # None means "flag not given"
    assert config.lr == 1e-3  # the flag wins over the file


def test_bad_toml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(tmp_path / "missing.toml", {})
    broken = tmp_path / "broken.toml"
    broken.write_text("epochs = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve_config(broken, {})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("epoch = 3")
    with pytest.raises(ConfigError, match=r"unknown\.toml: unknown key\(s\) epoch"):
        resolve_config(unknown, {})


def test_shipped_poster_configs_load():
    from pathlib import Path

    # The poster's eight experiments: {mnist,cifar10}-{linear,cosine}-{attn,noattn}.toml
    configs = sorted(path for path in (Path(__file__).parents[1] / "configs").glob("*.toml") if path.stem.count("-") == 2)
    assert len(configs) == 8
    for path in configs:
        config = resolve_config(path, {})
        dataset, schedule, attention = path.stem.split("-")
        assert (config.dataset, config.schedule) == (dataset, schedule)
        assert config.attention_levels == ((1,) if attention == "attn" else ())
        assert config.epochs == (30 if dataset == "mnist" else 60) and config.lr == 1e-4
        # Ho et al.'s CIFAR-10 recipe; a flipped digit is another image.
        assert (config.warmup_steps, config.random_flip) == ((5000, True) if dataset == "cifar10" else (0, False))
