"""The ``ddpm`` command: thin glue over the Python API.

Errors a user can cause (DdpmError) end with one line on stderr and exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import numpy as np

from .config import TrainConfig, field_names, load_toml, resolve_config
from .errors import ConfigError, DdpmError

# Option spellings that differ from the config field name.
_FLAG_NAMES = {"attention_levels": "--attention"}
_HELP = {
    "dataset": "mnist, fashion-mnist, cifar10, mnist-5k, or folder:PATH",
    "attention_levels": "UNet levels with self-attention, e.g. 1 or 0,1,2; 'none' for none",
    "channel_mults": "channel multiplier per level, e.g. 1,2,2",
    "batch_size": "global batch (per process x processes x grad_accum)",
    "max_steps": "stop after this many optimizer steps",
    "fid_batches": "validation minibatches for the per-epoch FID (0: off)",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except DdpmError as exc:
        print(f"ddpm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddpm: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm", description="Denoising diffusion models: train, sample, evaluate.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model (Algorithm 1)", description="Train a noise-prediction UNet. Flags override --config.")
    train.add_argument("--config", type=Path, help="TOML file with TrainConfig keys (see configs/)")
    train.add_argument("--out", type=Path, required=True, help="run directory to create (or continue with --resume)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    train.add_argument("--num-processes", type=int, default=1, help="data-parallel processes (launched through Accelerate)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_flags(train)
    train.set_defaults(handler=_cmd_train)

    sample = commands.add_parser("sample", help="sample images from a trained model", description="Sample a grid (PNG) and the samples (.npz).")
    sample.add_argument("run", type=Path, help="run directory (latest checkpoint) or a checkpoint file")
    sample.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    sample.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG grid path; the .npz goes beside it")
    sample.add_argument("--batch-size", type=int, default=256, help="images per sampling batch")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights (default) or raw")
    _add_sampler_flags(sample)
    sample.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sample.set_defaults(handler=_cmd_sample)

    demo = commands.add_parser("demo", help="train a small model on mnist-5k and sample from it (a few minutes on a CPU)")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (default runs/demo)")
    demo.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the demo's setting)")
    demo.set_defaults(handler=_cmd_demo)

    plot = commands.add_parser("plot", help="draw loss and FID curves of a run (PNG)")
    plot.add_argument("run", type=Path)
    plot.add_argument("--out", type=Path, default=None, help="PNG path (default RUN/curves.png)")
    plot.set_defaults(handler=_cmd_plot)
    return parser


# --- train ------------------------------------------------------------------------------

def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--batch-size for batch_size), default None = unset."""
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for name in field_names():
        annotation = hints[name]
        flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        help_text = f"{_HELP.get(name, '')} (default: {getattr(defaults, name)!r})".strip()
        if annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        choices = _literal_choices(annotation)
        parser.add_argument(flag, dest=name, type=_parser_for(annotation), choices=choices, default=None, help=help_text)


def _literal_choices(annotation: Any) -> tuple[str, ...] | None:
    inner = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
    return get_args(inner[0]) if get_origin(inner[0]) is Literal else None


def _parser_for(annotation: Any) -> Callable[[str], Any]:
    inner = [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) is not tuple else []
    base = inner[0] if len(inner) == 1 else annotation
    if get_origin(base) is tuple:
        return _int_list
    if base in (int, float):
        return base
    return str


def _int_list(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none", "off"):
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in field_names() if getattr(args, name) is not None}


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import resolve_resume_config, train

    if args.num_processes < 1:
        raise ConfigError("--num-processes must be >= 1")
    if args.num_processes > 1 and "LOCAL_RANK" not in os.environ:
        return _relaunch_with_accelerate(args.num_processes)
    overrides = _config_overrides(args)
    if args.resume:
        from_file = load_toml(args.config) if args.config else {}
        config = resolve_resume_config(args.out, {**from_file, **overrides})
    else:
        config = resolve_config(args.config, overrides)
    summary = train(config, args.out, resume=args.resume, progress=not args.no_progress)
    return 0 if summary.step else 1


def _relaunch_with_accelerate(num_processes: int) -> int:
    """``ddpm train --num-processes N`` = ``accelerate launch --multi_gpu --num_processes N -m ddpmkit train``.

    On a machine without a GPU, --multi_gpu is what makes Accelerate start connected
    (gloo) processes; training builds Accelerator(cpu=True) there.
    """
    argv = sys.argv[1:]
    forwarded = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--num-processes":
            skip = True
            continue
        if item.startswith("--num-processes="):
            continue
        forwarded.append(item)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), "-m", "ddpmkit", *forwarded,
    ]
    return subprocess.call(command)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- sample -----------------------------------------------------------------------------

def _add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    from .samplers import SAMPLER_NAMES, SPACING_NAMES, VARIANCE_NAMES

    parser.add_argument("--sampler", default="ddpm", choices=SAMPLER_NAMES, help="default ddpm (ancestral, Algorithm 2)")
    parser.add_argument("--steps", type=int, default=None, help="model evaluations (default: all num_steps)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale (0: deterministic)")
    parser.add_argument("--variance", default="beta", choices=VARIANCE_NAMES, help="ancestral sigma_t^2: beta or posterior (beta-tilde)")
    parser.add_argument("--spacing", default=None, choices=SPACING_NAMES, help="timestep spacing for fewer steps")
    parser.add_argument("--no-clip", dest="clip_denoised", action="store_false", help="do not clip predicted x0 to [-1, 1]")


def sampler_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = dict(sampler=args.sampler, steps=args.steps, eta=args.eta, variance=args.variance, clip_denoised=args.clip_denoised)
    if args.spacing:
        kwargs["spacing"] = args.spacing
    return kwargs


def _device(name: str) -> str:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device")
    return "cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name)


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from .checkpoint import load_trained_model
    from .data import to_uint8
    from .figures import save_image_grid
    from .samplers import sample_batches

    if args.num < 1 or args.batch_size < 1:
        raise ConfigError("--num and --batch-size must be >= 1")
    if args.out.suffix.lower() != ".png":
        raise ConfigError(f"--out must name a .png file, got {args.out}")
    device = _device(args.device)
    trained = load_trained_model(args.run, ema=args.ema, device=device)
    kwargs = sampler_kwargs(args)
    batches = []
    with tqdm(total=args.num, unit="img", desc="sampling") as bar:
        for batch in sample_batches(trained.model, trained.schedule, args.num, args.batch_size, trained.image_shape, seed=args.seed, device=device, **kwargs):
            batches.append(batch.cpu())
            bar.update(len(batch))
    samples = torch.cat(batches)
    grid = save_image_grid(samples[:256], args.out)
    arrays = args.out.with_suffix(".npz")
    np.savez_compressed(
        arrays, images=to_uint8(samples).numpy(), samples=samples.numpy(),
        checkpoint=str(trained.path), step=trained.step, ema=trained.ema, seed=args.seed, **{k: str(v) for k, v in kwargs.items()},
    )
    print(f"ddpm: {args.num} samples from {trained.path} (step {trained.step}, {'EMA' if trained.ema else 'raw'} weights)")
    print(f"ddpm: grid {grid}\nddpm: samples {arrays}")
    return 0


# --- demo and plot ----------------------------------------------------------------------

def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, max_steps=args.max_steps)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .figures import plot_metrics

    print(f"ddpm: wrote {plot_metrics(args.run, args.out)}")
    return 0
