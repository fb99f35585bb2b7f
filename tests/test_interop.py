"""diffusers checkpoints in and out (interop.py), with diffusers itself as the oracle: the same
network outputs, the same alphas_cumprod, the same DDPM steps, bit-identical round trips; the
Hub path against a local server; the README's snippet; benchmarks/reproduce_ddpm.py --quick."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import asdict, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

from ddpmkit import ConfigError
from ddpmkit.checkpoint import load_checkpoint, load_trained_model, save_checkpoint, step_checkpoint_path
from ddpmkit.classifier import train_and_cache_classifier
from ddpmkit.cli import main
from ddpmkit.config import TrainConfig
from ddpmkit.interop import (
    diffusers_unet_config,
    export_diffusers,
    import_diffusers,
    scheduler_settings_from_diffusers,
    unet_config_from_diffusers,
)
from ddpmkit.samplers import sample
from ddpmkit.unet import UNet, UNetConfig

REPO = Path(__file__).resolve().parents[1]

# google/ddpm-cifar10-32's config.json with 16/32/32/32 channels instead of 128/256/256/256.
CIFAR10_32_SCALED = dict(
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32, 32), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, norm_eps=1e-6, norm_num_groups=4, attention_head_dim=None,
)
MNIST = dict(  # 3 levels at 28x28, no attention anywhere; diffusers' defaults otherwise
    sample_size=28, in_channels=1, out_channels=1, block_out_channels=(8, 16, 16), layers_per_block=1,
    down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, add_attention=False, norm_num_groups=4,
)
MNIST_ATTENTION = {  # attention at level 1 and in the middle, in heads of 4 channels
    **MNIST, "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), "add_attention": True, "attention_head_dim": 4,
}
CONDITIONAL = dict(
    sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4, attention_head_dim=None, num_class_embeds=3,
)
TINY = dict(  # for the schedule and sampler tests: the network only has to be some network
    sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    attention_head_dim=None,
)
LAYOUTS = {"cifar10-32-scaled": CIFAR10_32_SCALED, "mnist": MNIST, "mnist-attention": MNIST_ATTENTION, "conditional": CONDITIONAL}


def random_unet2d(seed: int = 0, **options) -> UNet2DModel:
    """A UNet2DModel with every parameter randomised, GroupNorm scales and biases included,
    so that a key mapped to the wrong place changes the output."""
    torch.manual_seed(seed)
    model = UNet2DModel(**options).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def write_diffusers(path: Path, unet: UNet2DModel, *, flat: bool = False, **scheduler) -> Path:
    """A pipeline folder (unet/, scheduler/) or, ``flat``, google/ddpm-cifar10-32's layout."""
    if flat:
        unet.save_pretrained(path)
        DDPMScheduler(**scheduler).save_config(path)
    else:
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**scheduler)).save_pretrained(path)
    return path


def dataset_for(folder_dataset) -> str:
    return f"folder:{folder_dataset}"


def inputs(config: dict, batch: int = 3):
    size, channels = config["sample_size"], config["in_channels"]
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 500, 999][:batch])
    y = torch.tensor([0, 2, 1][:batch]) if config.get("num_class_embeds") else None
    return x, t, y


def max_difference(ours: UNet, theirs: UNet2DModel, config: dict, y_ours=None) -> float:
    x, t, y = inputs(config)
    with torch.no_grad():
        expected = theirs(x, t, class_labels=y).sample
        got = ours(x, t, y if y_ours is None else y_ours)
    assert expected.abs().max() > 0.1  # a real output, not one that hides the network
    return (got - expected).abs().max().item()


# --- the network, both directions -------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_imported_unet_computes_what_diffusers_computes(layout, tmp_path, folder_dataset):
    config = LAYOUTS[layout]
    theirs = random_unet2d(**config)
    source = write_diffusers(tmp_path / "source", theirs, flat=layout == "cifar10-32-scaled")
    import_diffusers(source, tmp_path / "run", dataset=dataset_for(folder_dataset))
    trained = load_trained_model(tmp_path / "run", cpu_workers=1)
    assert max_difference(trained.model, theirs, config) < 1e-5
    assert trained.image_shape == (config["in_channels"], config["sample_size"], config["sample_size"])


def test_the_scaled_cifar10_layout_maps_onto_every_new_unet_option():
    model_config, size = unet_config_from_diffusers(json.loads(json.dumps({"_class_name": "UNet2DModel", **CIFAR10_32_SCALED})))
    assert size == 16
    assert model_config == UNetConfig(
        in_channels=3, base_channels=16, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attention_levels=(1,),
        timestep_frequency_shift=1, timestep_cos_first=False, middle_attention=True, downsample_padding="bottom-right",
        norm_groups=4, norm_eps=1e-6, attention_head_dim=None,
    )


def test_old_attention_names_are_read_as_diffusers_reads_them(tmp_path, folder_dataset):
    # Older diffusers files name the attention's Linear layers query, key, value and proj_attn.
    theirs = random_unet2d(**MNIST_ATTENTION)
    source = write_diffusers(tmp_path / "source", theirs)
    weights_file = source / "unet" / "diffusion_pytorch_model.safetensors"
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {re.sub(r"\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f".{renames[m[1]]}.", k): v for k, v in load_file(weights_file).items()}
    assert sum(key.endswith(".query.weight") for key in old) == 4  # level 1: 1 down, 2 up; the middle
    save_file(old, weights_file)
    read_by_diffusers = UNet2DModel.from_pretrained(source / "unet").state_dict()  # diffusers takes these names too
    assert all(torch.equal(read_by_diffusers[key], value) for key, value in theirs.state_dict().items())
    import_diffusers(source, tmp_path / "run", dataset=dataset_for(folder_dataset))
    assert max_difference(load_trained_model(tmp_path / "run", cpu_workers=1).model, theirs, MNIST_ATTENTION) < 1e-5


def native_run(path: Path, folder_dataset, model_config: UNetConfig, image_size: int = 8, **train) -> Path:
    """A ddpmkit run holding a random model (raw) and another (EMA), as training writes them."""
    config = TrainConfig(dataset=dataset_for(folder_dataset), image_size=image_size, channels=model_config.in_channels,
                         num_steps=50, conditional=model_config.num_classes is not None, **train)
    weights = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = UNet.from_config(model_config)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        weights.append(model.state_dict())
    path.mkdir()
    (path / "config.json").write_text(config.to_json())
    save_checkpoint(
        step_checkpoint_path(path, 7), model=weights[0], ema=weights[1], optimizer=None, rng_states={}, config=config.to_dict(),
        state={"step": 7, "model_config": asdict(model_config), "image_size": image_size},
    )
    return path


NATIVE = {
    # Conditional with its "no label" row, attention in heads, fixed groups: exported as class 3 of 4.
    "conditional": UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), num_classes=3,
                              norm_groups=4, attention_head_dim=4),
    # ddpmkit's own layout and group rule (64 and 128 channels: 32 groups everywhere).
    "default-groups": UNetConfig(base_channels=64, channel_mults=(1,), num_res_blocks=1, attention_levels=(0,)),
}


@pytest.mark.parametrize("name", NATIVE, ids=list(NATIVE))
def test_exported_run_computes_the_same_in_diffusers(name, tmp_path, folder_dataset):
    model_config = NATIVE[name]
    run = native_run(tmp_path / "run", folder_dataset, model_config)
    assert main(["export-diffusers", str(run), "--out", str(tmp_path / "out")]) == 0
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "out")
    ours = load_trained_model(run, cpu_workers=1)
    described = {**diffusers_unet_config(model_config, 8), "in_channels": 1}
    if model_config.num_classes is None:
        assert max_difference(ours.model, pipeline.unet.eval(), described) < 1e-5
    else:
        assert pipeline.unet.config.num_class_embeds == 4
        assert max_difference(ours.model, pipeline.unet.eval(), described) < 1e-5  # labels 0, 2, 1
        x, t, _ = inputs(described)
        with torch.no_grad():  # diffusers' class 3 is ddpmkit's "no label"
            difference = pipeline.unet(x, t, class_labels=torch.tensor([3, 3, 3])).sample - ours.model(x, t)
        assert difference.abs().max() < 1e-5


def test_no_ema_exports_the_raw_weights(tmp_path, folder_dataset):
    run = native_run(tmp_path / "run", folder_dataset, NATIVE["conditional"])
    export_diffusers(run, tmp_path / "ema")
    export_diffusers(run, tmp_path / "raw", ema=False)
    checkpoint = load_checkpoint(step_checkpoint_path(run, 7))
    for folder, weights in (("ema", checkpoint.ema), ("raw", checkpoint.model)):
        exported = load_file(tmp_path / folder / "unet" / "diffusion_pytorch_model.safetensors")
        assert torch.equal(exported["conv_in.weight"], weights["input_conv.weight"])
    assert not torch.equal(checkpoint.ema["input_conv.weight"], checkpoint.model["input_conv.weight"])


def test_a_unet_ema_folder_gives_the_ema_weights(tmp_path, folder_dataset):
    source = write_diffusers(tmp_path / "source", random_unet2d(seed=0, **TINY))
    random_unet2d(seed=1, **TINY).save_pretrained(source / "unet_ema")  # as diffusers' training script saves its EMA
    imported = import_diffusers(source, tmp_path / "run", dataset=dataset_for(folder_dataset))
    assert imported.separate_ema
    raw, ema = (load_trained_model(tmp_path / "run", ema=which, cpu_workers=1).model for which in (False, True))
    for ours, seed in ((raw, 0), (ema, 1)):
        assert max_difference(ours, random_unet2d(seed=seed, **TINY), {**TINY, "sample_size": 8}) < 1e-5


def test_import_export_import_is_bit_identical(tmp_path, folder_dataset):
    theirs = random_unet2d(**CIFAR10_32_SCALED)
    source = write_diffusers(tmp_path / "source", theirs, flat=True, variance_type="fixed_large")
    dataset = dataset_for(folder_dataset)
    import_diffusers(source, tmp_path / "first", dataset=dataset)
    export_diffusers(tmp_path / "first", tmp_path / "exported")
    original = load_file(source / "diffusion_pytorch_model.safetensors")
    exported = load_file(tmp_path / "exported" / "unet" / "diffusion_pytorch_model.safetensors")
    assert sorted(exported) == sorted(original) and all(torch.equal(exported[key], original[key]) for key in original)
    import_diffusers(tmp_path / "exported", tmp_path / "second", dataset=dataset)
    first, second = (load_checkpoint(step_checkpoint_path(tmp_path / run, 0)) for run in ("first", "second"))
    for group in ("model", "ema"):
        a, b = getattr(first, group), getattr(second, group)
        assert sorted(a) == sorted(b) and all(torch.equal(a[key], b[key]) for key in a)
    assert first.config == second.config and first.state == second.state


def test_a_conditional_model_keeps_its_no_label_row_through_export_and_import(tmp_path, folder_dataset):
    run = native_run(tmp_path / "run", folder_dataset, NATIVE["conditional"])
    export_diffusers(run, tmp_path / "exported")
    import_diffusers(tmp_path / "exported", tmp_path / "again", dataset=dataset_for(folder_dataset))
    again = load_checkpoint(step_checkpoint_path(tmp_path / "again", 0))
    assert UNetConfig(**again.state["model_config"]) == replace(NATIVE["conditional"], middle_attention=True)
    original = load_checkpoint(step_checkpoint_path(run, 7)).ema
    assert all(torch.equal(again.model[key], original[key]) for key in original)
    # Classifier-free guidance needs the "no label" row, so it works on the re-imported run.
    argv = ["sample", str(tmp_path / "again"), "--class", "0,2", "--per-class", "1", "--guidance", "2", "--sampler", "ddim",
            "--steps", "3", "--out", str(tmp_path / "cfg.png"), "--device", "cpu", "--cpu-workers", "1"]
    assert main(argv) == 0


def test_a_diffusers_class_conditional_model_needs_a_label_for_every_image(tmp_path, folder_dataset, capsys):
    source = write_diffusers(tmp_path / "source", random_unet2d(**CONDITIONAL))
    import_diffusers(source, tmp_path / "run", dataset=dataset_for(folder_dataset))
    trained = load_trained_model(tmp_path / "run", cpu_workers=1)
    labelled = sample(trained.model, trained.schedule, (2, 1, 8, 8), labels=torch.tensor([0, 2]), sampler="ddim", steps=2)
    assert labelled.shape == (2, 1, 8, 8)
    base = ["sample", str(tmp_path / "run"), "--sampler", "ddim", "--steps", "2", "--out", str(tmp_path / "s.png"), "--device", "cpu"]
    for extra in ([], ["--class", "1", "--per-class", "2", "--guidance", "1"]):
        assert main([*base, *extra]) == 2
        last = capsys.readouterr().err.splitlines()[-1]  # after the progress bar: it fails at the first model call
        assert last.startswith("ddpm: error: this conditional model has no \"no label\" embedding")


# --- the schedule and the sampler -----------------------------------------------------------------

SCHEDULERS = {
    "linear-1000": {},
    "linear-50": {"num_train_timesteps": 50, "beta_start": 1e-4, "beta_end": 0.05},
    "cosine-1000": {"beta_schedule": "squaredcos_cap_v2"},
}


@pytest.mark.parametrize("name", SCHEDULERS, ids=list(SCHEDULERS))
def test_schedules_equal_diffusers_alphas_cumprod_both_ways(name, tmp_path, folder_dataset):
    scheduler = SCHEDULERS[name]
    write_diffusers(tmp_path / "source", random_unet2d(**TINY), **scheduler)
    import_diffusers(tmp_path / "source", tmp_path / "run", dataset=dataset_for(folder_dataset))
    ours = load_trained_model(tmp_path / "run", cpu_workers=1).schedule.alpha_bars
    theirs = DDPMScheduler(**scheduler).alphas_cumprod.double()
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-6
    export_diffusers(tmp_path / "run", tmp_path / "exported")
    exported = DDPMScheduler.from_pretrained(tmp_path / "exported" / "scheduler").alphas_cumprod.double()
    assert (exported - ours).abs().max() < 1e-6


SAMPLING = [("fixed_large", True), ("fixed_small", False)]


@pytest.mark.parametrize("variance_type, clip", SAMPLING, ids=[f"{v}-clip{c}" for v, c in SAMPLING])
def test_ddpm_pipeline_and_the_ancestral_sampler_take_the_same_steps(variance_type, clip, tmp_path, folder_dataset):
    # Every step of a 12-step chain, the same initial and per-step noise from one generator.
    scheduler = dict(num_train_timesteps=12, beta_start=1e-3, beta_end=0.2, variance_type=variance_type, clip_sample=clip)
    theirs = random_unet2d(**TINY)
    write_diffusers(tmp_path / "source", theirs, **scheduler)
    imported = import_diffusers(tmp_path / "source", tmp_path / "run", dataset=dataset_for(folder_dataset))
    assert (imported.variance, imported.clip_denoised) == ({"fixed_large": "beta", "fixed_small": "posterior"}[variance_type], clip)
    trained = load_trained_model(tmp_path / "run", cpu_workers=1)
    pipeline = DDPMPipeline(unet=theirs, scheduler=DDPMScheduler(**scheduler))
    expected = pipeline(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=12, output_type="np").images
    ours = sample(trained.model, trained.schedule, (2, 1, 8, 8), sampler="ddpm", variance=imported.variance,
                  clip_denoised=imported.clip_denoised, generator=torch.Generator().manual_seed(3))
    assert torch.from_numpy(expected).std() > 0.1
    torch.testing.assert_close(((ours + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1), torch.from_numpy(expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variance_type, clip", SAMPLING, ids=[f"{v}-clip{c}" for v, c in SAMPLING])
def test_respaced_steps_equal_ddpm_scheduler_steps_at_the_same_timesteps(variance_type, clip, tmp_path, folder_dataset):
    # 5 of 1000 steps: both recompute beta from abar at the visited steps (Nichol & Dhariwal sec. 4).
    scheduler = dict(variance_type=variance_type, clip_sample=clip)
    theirs = random_unet2d(**TINY)
    write_diffusers(tmp_path / "source", theirs, **scheduler)
    imported = import_diffusers(tmp_path / "source", tmp_path / "run", dataset=dataset_for(folder_dataset))
    trained = load_trained_model(tmp_path / "run", cpu_workers=1)
    ours = sample(trained.model, trained.schedule, (2, 1, 8, 8), sampler="ddpm", steps=5, spacing="uniform",
                  variance=imported.variance, clip_denoised=imported.clip_denoised, generator=torch.Generator().manual_seed(4))
    stepper = DDPMScheduler(**scheduler)
    stepper.set_timesteps(timesteps=[999, 749, 499, 249, 0])  # ddpmkit's "uniform" indices for 5 of 1000
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 1, 8, 8, generator=generator)
    with torch.no_grad():
        for t in stepper.timesteps:
            x = stepper.step(theirs(x, t).sample, t, x, generator=generator).prev_sample
    assert x.abs().max() > 0.5
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


# --- what is refused ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "change, message",
    [
        ({"down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"]}, "down_block_types=['CrossAttnDownBlock2D', 'DownBlock2D'] is not supported"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier' is not supported"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift='scale_shift' is not supported"),
        ({"class_embed_type": "timestep"}, "class_embed_type='timestep' is not supported"),
        ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D"]}, "up_block_types=['UpBlock2D', 'AttnUpBlock2D'] must mirror"),
        ({"block_out_channels": [8, 12]}, "block_out_channels=[8, 12] is not supported"),
        ({"out_channels": 2}, "out_channels=2 is not supported"),
        ({"center_input_sample": True}, "center_input_sample=True is not supported"),
        ({"cross_attention_dim": 32}, "unknown UNet2DModel option(s) cross_attention_dim"),
    ],
)
def test_unsupported_unet_options_are_refused_by_name(change, message):
    with pytest.raises(ConfigError) as error:
        unet_config_from_diffusers({**TINY, **change}, source="x/config.json")
    assert str(error.value).startswith("x/config.json: ") and message in str(error.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prediction_type": "v_prediction"}, "prediction_type='v_prediction' is not supported"),
        ({"beta_schedule": "scaled_linear"}, "beta_schedule='scaled_linear' is not supported"),
        ({"variance_type": "learned_range"}, "variance_type='learned_range' is not supported"),
        ({"thresholding": True}, "thresholding=True is not supported"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas=[0.1, 0.2] is not supported"),
        ({"_class_name": "DDIMScheduler"}, "DDIMScheduler is not a DDPMScheduler"),
    ],
)
def test_unsupported_scheduler_options_are_refused_by_name(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        scheduler_settings_from_diffusers(change)


def test_a_folder_with_only_pickled_weights_is_refused(tmp_path, folder_dataset, capsys):
    source = write_diffusers(tmp_path / "source", random_unet2d(**TINY))
    weights = source / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))  # what matters is that no .safetensors is there
    assert main(["import-diffusers", str(source), "--out", str(tmp_path / "run"), "--dataset", dataset_for(folder_dataset)]) == 2
    err = capsys.readouterr().err
    assert "diffusion_pytorch_model.bin, a pickle, which ddpmkit never loads" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_export_refuses_what_diffusers_cannot_represent(tiny_run, tmp_path, capsys):
    # The tiny run's 8 and 16 channels get 4 and 8 groups (unet.group_count's narrow-model rule).
    assert main(["export-diffusers", str(tiny_run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "different group counts (4 at 8 channels" in err and "one norm_num_groups for every GroupNorm" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="a learned variance"):
        diffusers_unet_config(UNetConfig(out_channels=2, norm_groups=4), 8)


def test_import_checks_the_dataset_geometry(tmp_path, folder_dataset):
    write_diffusers(tmp_path / "source", random_unet2d(**TINY))
    with pytest.raises(ConfigError, match=r"mnist-5k images are 28x28 with 1 channel\(s\), the model's 8x8 with 1"):
        import_diffusers(tmp_path / "source", tmp_path / "run", dataset="mnist-5k")


# --- the command line, the Hub, the README, the benchmark -----------------------------------------------

def test_import_prints_the_sampler_flags_of_its_scheduler_and_the_run_samples(tmp_path, folder_dataset, capsys):
    write_diffusers(tmp_path / "source", random_unet2d(**TINY), num_train_timesteps=20, variance_type="fixed_small", clip_sample=False)
    run = tmp_path / "run"
    assert main(["import-diffusers", str(tmp_path / "source"), "--out", str(run), "--dataset", dataset_for(folder_dataset)]) == 0
    out = capsys.readouterr().out
    assert f"its scheduler samples as: ddpm sample {run} --variance posterior --no-clip" in out
    assert "one set of weights, as both EMA and raw" in out
    assert json.loads((run / "imported.json").read_text())["sampling"] == {"variance": "posterior", "clip_denoised": False}
    for sampler in ("ddpm", "dpm-solver++"):
        assert main(["sample", str(run), "--num", "2", "--sampler", sampler, "--steps", "3", "--out", str(tmp_path / f"{sampler}.png"),
                     "--device", "cpu"]) == 0
    assert main(["figures", "reverse", str(run), "--steps", "4", "--frames", "2", "--num-images", "1", "--device", "cpu"]) == 0
    assert main(["import-diffusers", str(tmp_path / "source"), "--out", str(run), "--dataset", dataset_for(folder_dataset)]) == 2


class _HubRepo(BaseHTTPRequestHandler):
    """The few Hugging Face Hub endpoints snapshot_download calls, serving one folder as one repo."""

    root: Path
    repo: str
    commit = "0" * 40

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        path = self.path.split("?")[0]
        files = sorted(p for p in self.root.rglob("*") if p.is_file())
        headers = {"Content-Type": "application/json"}
        if path in (f"/api/models/{self.repo}/revision/main", f"/api/models/{self.repo}"):
            body = json.dumps({"id": self.repo, "sha": self.commit, "siblings": [{"rfilename": str(p.relative_to(self.root))} for p in files]}).encode()
        elif path.startswith(f"/api/models/{self.repo}/tree/"):
            body = json.dumps([{"type": "file", "path": str(p.relative_to(self.root)), "size": p.stat().st_size,
                                "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in files]).encode()
        elif (match := re.fullmatch(rf"/{self.repo}/resolve/[^/]+/(.+)", path)) and (self.root / match[1]).is_file():
            body = (self.root / match[1]).read_bytes()
            headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": self.commit, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'}
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)


def _ddpm(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """The ddpm command in a fresh process: huggingface_hub reads HF_ENDPOINT when it is imported."""
    return subprocess.run([sys.executable, "-m", "ddpmkit", *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_a_hub_repo_id_is_fetched_from_hf_endpoint(tmp_path, folder_dataset):
    source = write_diffusers(tmp_path / "source", random_unet2d(**TINY))
    handler = type("Repo", (_HubRepo,), {"root": source, "repo": "someone/tiny-ddpm"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    try:
        result = _ddpm(["import-diffusers", "someone/tiny-ddpm", "--out", str(tmp_path / "run"), "--dataset", dataset_for(folder_dataset)], endpoint)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr
    import_diffusers(source, tmp_path / "local", dataset=dataset_for(folder_dataset))
    fetched, local = (load_checkpoint(step_checkpoint_path(tmp_path / run, 0)).model for run in ("run", "local"))
    assert sorted(fetched) == sorted(local) and all(torch.equal(fetched[key], local[key]) for key in local)
    # The server is gone and nothing is cached: offline, one line says which files to put where.
    offline = {**endpoint, "HF_HOME": str(tmp_path / "empty")}
    result = _ddpm(["import-diffusers", "someone/tiny-ddpm", "--out", str(tmp_path / "again"), "--dataset", dataset_for(folder_dataset)], offline)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "could not be fetched from the Hub" in result.stderr and "https://huggingface.co/someone/tiny-ddpm into a folder" in result.stderr


def test_a_hub_repo_id_without_huggingface_hub_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=re.escape("pip install 'ddpmkit[hub]'")):
        import_diffusers("someone/tiny-ddpm", tmp_path / "run", dataset="mnist-5k")


def readme_snippet() -> str:
    """The Python lines of the README's export example, between its marker comments."""
    readme = (REPO / "README.md").read_text()
    return re.search(r"<!-- diffusers-snippet -->\n```python\n(.*?)```", readme, re.S)[1]


def test_the_readmes_diffusers_snippet_runs_on_an_exported_run(tmp_path, folder_dataset, monkeypatch):
    model_config = UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, norm_groups=4)
    export_diffusers(native_run(tmp_path / "run", folder_dataset, model_config), tmp_path / "runs" / "small-diffusers")
    snippet = readme_snippet()
    assert len(snippet.strip().splitlines()) == 3
    monkeypatch.chdir(tmp_path)  # the snippet's relative path names the folder just written
    namespace: dict = {}
    exec(snippet, namespace)
    assert len(namespace["images"]) == 4 and namespace["images"][0].size == (8, 8)


def test_reproduce_benchmark_quick_runs_end_to_end_on_an_imported_model(tmp_path, folder_dataset):
    cache = tmp_path / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DDPMKIT_CACHE", str(cache))
        train_and_cache_classifier(dataset_for(folder_dataset), image_size=8, channels=1, epochs=1)
    write_diffusers(tmp_path / "source", random_unet2d(**TINY), num_train_timesteps=20, variance_type="fixed_small")
    import_diffusers(tmp_path / "source", tmp_path / "run", dataset=dataset_for(folder_dataset))
    script = REPO / "benchmarks" / "reproduce_ddpm.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), "--quick"], env={**os.environ, "DDPMKIT_CACHE": str(cache)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "reproduce" / "reproduce.json").read_text())
    rows = {(row["sampler"], row["steps"]) for row in summary["rows"]}
    assert rows == {("ddpm", 20), ("ddim", 2), ("ddim", 4), ("dpm-solver++", 2), ("dpm-solver++", 4)}
    assert summary["rows"][0]["variance"] == "posterior"  # the ancestral row samples as the imported scheduler
    assert all(row["fid"] > 0 for row in summary["rows"]) and summary["num"] == 16
    assert summary["bits_per_dim"] > 0 and summary["nll"]["num_images"] == 4
    assert summary["nll"]["settings"]["variance"] == "posterior"  # the bound with the imported scheduler's variance
    assert summary["published"]["fid_train"] == 3.17 and summary["extractor"].startswith("classifier:")
