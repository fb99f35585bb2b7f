"""The ``ddpm`` command: thin glue over the Python API.

Conventions of every command:

* Messages are one line each, prefixed ``ddpm: `` (io.say); what a command is about to
  do is said before it does it, and a long command ends with what it did, how long it
  took, where the results are and the command to run next.
* Errors a user can cause (DdpmError, and a bad argument) end with one line on stderr and
  exit status 2; anything else is a bug and keeps its traceback.
* SIGINT and SIGTERM stop a command with exit status 130 and 143 (128 + the signal),
  after what was finished is saved, and one line says how to continue where one can.
* Every output path is checked before any work (io.check_writable).
* Every result file records the settings that made it (fid.fid_settings and the
  guidance's), typed: in the .npz as scalars, in JSON, and in a PNG's text chunk.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from . import __version__
from .choices import DEFAULT_SPACING, DEVICES
from .config import RENAMED_KEYS, TrainConfig, field_names, load_toml, resolve_config
from .errors import ConfigError, DdpmError, Interrupted
from .io import check_writable, say
from .validation import resolve_device

_CPU_WORKERS_HELP = ("CPU: split each batch over this many threads, one core each (0: one per core, where it applies; "
                     "1: off; speeds in benchmarks/README.md)")
# Option spellings that differ from the config field name.
_FLAG_NAMES = {"attention_levels": "--attention"}
_HELP = {
    "dataset": "mnist, fashion-mnist, cifar10, mnist-5k, or folder:PATH",
    "attention_levels": "UNet levels with self-attention, e.g. 1 or 0,1,2; 'none' for none",
    "channel_mults": "channel multiplier per level, e.g. 1,2,2",
    "batch_size": "global batch (per process x processes x grad_accum)",
    "max_steps": "stop after this many optimizer steps",
    "fid_batches": "validation minibatches for the per-epoch FID (0: off; needs ddpm train-classifier for the dataset)",
    "tensorboard": "also log metrics and sample grids to RUN/tensorboard (pip install 'ddpmkit[tensorboard]')",
    "compile": "torch.compile the model (Accelerate's inductor backend): opt-in, compiling first takes minutes",
    "cpu_workers": _CPU_WORKERS_HELP,
    "preview_images": "images in the grid sampled after each epoch (RUN/samples/epoch-NNN.png; 0: none)",
    "prediction": "what the network predicts: eps (Ho et al.), x0, or v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho)",
    "learn_variance": "also output the reverse variance (Improved DDPM eq. 15), trained by the hybrid loss L_simple + 0.001 L_vlb",
    "loss_weighting": "none, or min-snr: weight each t by min(SNR, gamma) in x0 units (Hang et al. 2023)",
    "min_snr_gamma": "gamma of --loss-weighting min-snr",
    "warmup_steps": "linear learning-rate warm-up over this many steps (Ho et al.'s CIFAR-10: 5000; 0: off)",
    "random_flip": "flip training images horizontally with p = 1/2 (Ho et al.'s CIFAR-10; not for digits)",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.handler(args)
    except DdpmError as exc:
        print(f"ddpm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # ^C, or Interrupted: a signal after which the work was saved
        number = getattr(exc, "signal_number", signal.SIGINT)
        what = str(exc) or "interrupted"
        resume = args.resume_with(args, argv)
        print(f"ddpm: {what} ({signal.Signals(number).name})" + (f"; resume with: {resume}" if resume else ""), file=sys.stderr)
        return 128 + number
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM outside training (which checkpoints first): stop as ^C does, with its own exit status."""
    raise Interrupted("terminated", signum)


def _same_command(args: argparse.Namespace, argv: list[str]) -> str:
    """The command line that continues an interrupted command which resumes by itself (fid, ablation, demo)."""
    return shlex.join(["ddpm", *argv])


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line and a pointer to --help, not the usage block."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"ddpm: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ddpm", description="Denoising diffusion models: train, sample, evaluate.")
    parser.add_argument("--version", action="version", version=f"ddpm (ddpmkit) {__version__}")
    parser.set_defaults(resume_with=lambda args, argv: None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model (Algorithm 1)", description="Train a noise-prediction UNet. Flags override --config.")
    train.add_argument("--config", type=Path, help="TOML file with TrainConfig keys (see configs/)")
    train.add_argument("--out", type=Path, required=True, help="run directory to create (or continue with --resume)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    train.add_argument("--num-processes", type=int, default=1, help="data-parallel processes (launched through Accelerate)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_flags(train)
    train.set_defaults(handler=_cmd_train, resume_with=lambda args, argv: f"ddpm train --out {shlex.quote(str(args.out))} --resume")

    sample = commands.add_parser("sample", help="sample images from a trained model", description="Sample a grid (PNG) and the samples (.npz).")
    sample.add_argument("run", type=Path, help="run directory (latest checkpoint) or a checkpoint file")
    sample.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    sample.add_argument("--out", type=Path, default=Path("samples.png"),
                        help="PNG grid path (default samples.png); the .npz of all samples goes beside it")
    _add_model_run_flags(sample)
    _add_sampler_flags(sample)
    _add_guidance_flags(sample)
    sample.set_defaults(handler=_cmd_sample)

    demo = commands.add_parser("demo", help="train a small model on mnist-5k and sample from it (a few minutes on a CPU)")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (default runs/demo)")
    demo.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the demo's setting)")
    demo.set_defaults(handler=_cmd_demo, resume_with=_same_command)

    plot = commands.add_parser("plot", help="draw loss and FID curves of a run (PNG)")
    plot.add_argument("run", type=Path)
    plot.add_argument("--out", type=Path, default=None, help="PNG path (default RUN/curves.png)")
    plot.set_defaults(handler=_cmd_plot)

    _add_guidance_sweep_command(commands)
    _add_evaluation_commands(commands)
    _add_experiment_commands(commands)
    _add_interop_commands(commands)
    return parser


# --- train ------------------------------------------------------------------------------

def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--batch-size for batch_size), default None = unset;
    a renamed field's old flag (config.RENAMED_KEYS) still works, unlisted."""
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for name in field_names():
        annotation = hints[name]
        flags = [_flag(name)] + [_flag(old) for old, new in RENAMED_KEYS.items() if new == name]
        help_text = f"{_HELP.get(name, '')} (default: {getattr(defaults, name)!r})".strip()
        if annotation is bool:
            parser.add_argument(flags[0], dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind = dict(dest=name, type=_parser_for(annotation), choices=_literal_choices(annotation), default=None)
        parser.add_argument(flags[0], **kind, help=help_text)
        for old in flags[1:]:
            parser.add_argument(old, **kind, help=argparse.SUPPRESS)


def _flag(name: str) -> str:
    return _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _literal_choices(annotation: Any) -> tuple[str, ...] | None:
    """The values of a Literal annotation, also inside Optional; None for any other type."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    inner = [a for a in get_args(annotation) if a is not type(None)]
    return get_args(inner[0]) if len(inner) == 1 and get_origin(inner[0]) is Literal else None


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
    if summary.interrupted and not summary.main_process:  # the main process says how to resume
        return 128 + summary.stop_signal
    if summary.interrupted:
        raise Interrupted(f"training stopped at step {summary.step}", summary.stop_signal)
    if summary.main_process:
        say(f"next: ddpm sample {shlex.quote(str(args.out))} --sampler dpm-solver++ --steps 20 "
            f"--out {shlex.quote(str(args.out / 'samples.png'))}")
    return 0


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
    return subprocess.call(accelerate_launch_command(num_processes, ["-m", "ddpmkit", *forwarded]))


def accelerate_launch_command(num_processes: int, program: list[str]) -> list[str]:
    """The ``accelerate launch`` command line that runs ``python PROGRAM`` on num_processes
    connected processes of this machine (gloo on CPU, NCCL on GPUs).

    Every launcher option is given, so that no Accelerate config file is looked for;
    "--mixed_precision no" does not override --precision, because the Accelerator that
    training builds is given its precision explicitly, which wins over the launcher's.
    """
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), *program,
    ]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- sample -----------------------------------------------------------------------------

def _add_model_run_flags(parser: argparse.ArgumentParser) -> None:
    """How a trained model is loaded and run: shared by sample and guidance-sweep."""
    parser.add_argument("--batch-size", type=int, default=256, help="images per sampling batch (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="batch k is drawn from the stream (seed, k) (default 0)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights (default) or raw")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (first batch compiles for minutes; turns CPU worker threads off; "
                             "which is faster where: benchmarks/README.md)")
    parser.add_argument("--cpu-workers", type=int, default=0, help=_CPU_WORKERS_HELP)


def _add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    from .choices import SAMPLER_NAMES, SPACING_NAMES, VARIANCE_NAMES

    parser.add_argument("--sampler", default="ddpm", choices=SAMPLER_NAMES, help="default ddpm (ancestral, Algorithm 2)")
    parser.add_argument("--steps", type=int, default=None, help="model evaluations (default: all num_steps)")
    parser.add_argument("--eta", type=float, default=0.0, help="--sampler ddim only: its noise scale in [0, 1] (default 0: deterministic)")
    parser.add_argument("--variance", default=None, choices=VARIANCE_NAMES,
                        help="--sampler ddpm only: sigma_t^2, beta or posterior (beta-tilde), or learned for a model trained "
                             "with --learn-variance (default: learned for such a model, else beta)")
    parser.add_argument("--spacing", default=DEFAULT_SPACING, choices=SPACING_NAMES,
                        help=f"which steps fewer steps visit (default {DEFAULT_SPACING})")
    parser.add_argument("--no-clip", dest="clip_denoised", action="store_false", help="do not clip predicted x0 to [-1, 1]")


def sampler_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler flags as keywords of samplers.sample, checked and named by their flags:
    eta only for ddim and the variance only for ddpm, the samplers that use them."""
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    if not 0.0 <= args.eta <= 1.0:
        raise ConfigError(f"--eta must be in [0, 1], got {args.eta}")
    if args.eta and args.sampler != "ddim":
        raise ConfigError(f"--eta is the noise of --sampler ddim; --sampler {args.sampler} has none to set")
    if args.variance is not None and args.sampler != "ddpm":
        raise ConfigError(f"--variance is the noise of --sampler ddpm (ancestral); --sampler {args.sampler} does not use it")
    kwargs = dict(sampler=args.sampler, steps=args.steps, spacing=args.spacing, clip_denoised=args.clip_denoised)
    if args.sampler == "ddim":
        kwargs["eta"] = args.eta
    if args.variance is not None:
        kwargs["variance"] = args.variance
    return kwargs


def _loaded(args: argparse.Namespace, device: str) -> Any:
    """The model of RUN as the flags of _add_model_run_flags ask for it, said in one line;
    --steps checked against its number of steps."""
    from .checkpoint import load_trained_model

    trained = load_trained_model(args.run, ema=args.ema, device=device, compile=args.compile, cpu_workers=args.cpu_workers)
    if args.steps is not None and args.steps > trained.schedule.num_steps:
        raise ConfigError(f"--steps must be at most the model's {trained.schedule.num_steps} steps, got {args.steps}")
    return trained


def _describe_sampling(trained: Any, kwargs: dict[str, Any], device: str) -> str:
    """'RUN (step N, EMA weights), ddim, 50 steps, on cpu': what a command samples with."""
    steps = kwargs["steps"] or trained.schedule.num_steps
    return (f"{trained.path} (step {trained.step}, {'EMA' if trained.ema else 'raw'} weights), "
            f"{kwargs['sampler']} sampler, {steps} steps, on {device}")


def _trained_sampler_kwargs(args: argparse.Namespace, trained: Any) -> dict[str, Any]:
    """sampler_kwargs with how the trained model's output is read: its prediction target, and
    --variance (default: the model's own)."""
    from .config import model_output_options

    kwargs = sampler_kwargs(args)
    return {**kwargs, **model_output_options(trained.config, kwargs.pop("variance", None))}


def _cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .fid import fid_settings
    from .images import grid_selection, save_image_grid, to_uint8
    from .samplers import sample_batches, step_progress

    if args.num < 1 or args.batch_size < 1:
        raise ConfigError("--num and --batch-size must be >= 1")
    if args.out.suffix.lower() != ".png":
        raise ConfigError(f"--out must name a .png file, got {args.out}")
    arrays = args.out.with_suffix(".npz")
    check_writable([args.out, arrays])
    device = resolve_device(args.device)
    trained = _loaded(args, device)
    kwargs = _trained_sampler_kwargs(args, trained)
    guidance, guidance_record, described = _guidance_options(args, trained, device)
    labels = guidance.get("labels")
    num = args.num if labels is None else len(labels)
    steps = kwargs["steps"] or trained.schedule.num_steps
    num_batches = -(-num // args.batch_size)
    say(f"sampling {num} images from {_describe_sampling(trained, kwargs, device)}{described}; "
        f"{num_batches} batch(es) of at most {args.batch_size}")
    started = time.perf_counter()
    batches = []
    with step_progress(num_batches, steps) as advance:
        for batch in sample_batches(trained.model, trained.schedule, num, args.batch_size, trained.image_shape, seed=args.seed,
                                    device=device, callback=advance, **kwargs, **guidance):
            batches.append(batch.cpu())
    samples = torch.cat(batches)
    settings = {**fid_settings(trained, seed=args.seed, batch_size=args.batch_size, **kwargs), "num": num, "device": device,
                **guidance_record}
    shown, per_row = grid_selection(labels, num)
    grid = save_image_grid(samples[shown], args.out, nrow=per_row, settings=settings)
    extra = {} if labels is None else {"labels": labels.numpy()}
    np.savez_compressed(arrays, images=to_uint8(samples).numpy(), samples=samples.numpy(), **extra,
                        **{key: np.asarray(value) for key, value in settings.items()})
    say(f"{num} samples in {time.perf_counter() - started:.0f} s: {arrays} (images uint8, samples in [-1, 1], the settings)")
    if labels is not None:
        say(f"grid {grid}: one row per class, the first {per_row} images of each" +
            (f" ({len(shown)} of {num}; all are in the .npz)" if len(shown) < num else ""))
    else:
        say(f"grid {grid}" + (f": the first {len(shown)} of {num} images (all are in the .npz)" if len(shown) < num else ""))
    return 0


# --- demo and plot ----------------------------------------------------------------------

def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, max_steps=args.max_steps)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .figures import plot_metrics

    check_writable([args.out or args.run / "curves.png"])
    say(f"wrote {plot_metrics(args.run, args.out)}")
    return 0


# --- guidance ---------------------------------------------------------------------------

_CLASS_HELP = "classes to generate: 3, 3,7 or all"
_GUIDANCE_HELP = (
    "classifier-free guidance weight w of Ho & Salimans eq. 6: eps~ = (1 + w) eps(x_t, y) - w eps(x_t, no label); "
    "diffusers' guidance_scale is 1 + w; 0 (default) is plain conditional sampling. Needs a model trained with --conditional"
)
_CLASSIFIER_GUIDANCE_HELP = (
    "classifier guidance scale lambda (Dhariwal & Nichol): eps - sqrt(1 - abar_t) lambda grad for ddim and "
    "dpm-solver++, mean + lambda Sigma grad for ancestral ddpm (form guided-diffusion), eps - lambda grad (form poster), "
    "grad = grad_x log p(y | x_t, t) taken at the sampler's current noisy x_t and its step t, before the step's update "
    "(not at the predicted x0). 0 is unguided sampling, exactly. Works with unconditional and conditional models"
)


def _add_guidance_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--class", dest="classes", type=_class_list, default=None, metavar="CLASSES", help=_CLASS_HELP)
    parser.add_argument("--per-class", type=int, default=None, metavar="N",
                        help="N images of each class instead of --num; the grid has one row per class")
    parser.add_argument("--guidance", type=float, default=0.0, metavar="W", help=_GUIDANCE_HELP)
    parser.add_argument("--classifier-guidance", type=float, default=None, metavar="LAMBDA", help=_CLASSIFIER_GUIDANCE_HELP)
    _add_guiding_classifier_flags(parser)


def _add_guiding_classifier_flags(parser: argparse.ArgumentParser) -> None:
    from .choices import DEFAULT_GUIDANCE_FORM, GUIDANCE_FORMS

    parser.add_argument("--classifier", type=Path, default=None, metavar="PATH",
                        help="guiding classifier directory (default: the cached one of the run's dataset, "
                             "noisy for the run's schedule in form guided-diffusion, the clean guide (--guide) in form "
                             "poster; see ddpm train-classifier)")
    parser.add_argument("--guidance-form", default=DEFAULT_GUIDANCE_FORM, choices=GUIDANCE_FORMS,
                        help="guided-diffusion: a noisy classifier p(y | x_t, t) (default); poster: a clean classifier "
                             "p(y | x_t), no sqrt(1 - abar_t) factor, typical lambda 200")


def _class_list(text: str) -> tuple[int, ...] | Literal["all"]:
    if text.strip().lower() == "all":
        return "all"
    classes = _int_list(text)
    if not classes:
        raise argparse.ArgumentTypeError(f"expected 'all' or comma-separated class numbers, got {text!r}")
    return classes


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _guidance_options(args: argparse.Namespace, trained: Any, device: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """sample_batches keywords (labels, guidance_scale, classifier, ...) for ``ddpm sample``'s
    guidance flags, what the results record of them, and a phrase describing them; all
    empty without --class."""
    from .classifier import classifier_provenance, load_guiding_classifier
    from .guidance import check_classifier_free, class_labels, is_conditional, num_guided_classes, resolve_classes

    if args.classes is None:
        if args.per_class is not None or args.guidance or args.classifier_guidance is not None:
            raise ConfigError("--per-class, --guidance and --classifier-guidance need --class: the classes to generate")
        return {}, {}, ""
    if args.classifier is not None and args.classifier_guidance is None:
        raise ConfigError("--classifier is the classifier of --classifier-guidance; give that too")
    if args.per_class is not None and args.per_class < 1:
        raise ConfigError("--per-class must be >= 1")
    if not args.guidance >= 0:
        raise ConfigError(f"--guidance must be >= 0 (0: plain conditional sampling), got {args.guidance}")
    if args.classifier_guidance is not None and not 0 <= args.classifier_guidance < float("inf"):
        raise ConfigError(f"--classifier-guidance must be finite and >= 0, got {args.classifier_guidance}")
    check_classifier_free(trained.model, args.guidance, trained.config.label_dropout)
    options: dict[str, Any] = {"guidance_scale": args.guidance}
    conditional = is_conditional(trained.model)
    record: dict[str, Any] = {"guidance": args.guidance} if conditional else {}  # w is a conditional model's
    classifier = None
    if args.classifier_guidance is not None:
        classifier, path, _ = load_guiding_classifier(
            trained.config.dataset, args.guidance_form, args.classifier, schedule=trained.schedule, device=device
        )
        options.update(classifier=classifier, classifier_scale=args.classifier_guidance, guidance_form=args.guidance_form)
        record.update(classifier_guidance=args.classifier_guidance, guidance_form=args.guidance_form, **classifier_provenance(path))
    classes = resolve_classes(args.classes, num_guided_classes(trained.model, classifier))
    if args.per_class is not None:
        labels = class_labels(classes, args.per_class)
    else:  # --num images, one block per class (the last block may be shorter)
        labels = class_labels(classes, -(-args.num // len(classes)))[: args.num]
    options["labels"] = labels
    record.update(classes=classes, **({"per_class": args.per_class} if args.per_class is not None else {}))
    described = f"; class{'es' if len(classes) > 1 else ''} {', '.join(map(str, classes))}"
    if conditional:
        described += f", classifier-free w = {args.guidance:g}"
    if classifier is not None:
        described += f", classifier guidance lambda = {args.classifier_guidance:g} ({args.guidance_form}, {record['classifier']})"
    return options, record, described


def _add_guidance_sweep_command(commands: Any) -> None:
    from .choices import FEATURE_KINDS, SWEEP_KINDS

    sweep = commands.add_parser(
        "guidance-sweep", help="class accuracy, FID, precision and recall against the guidance scale",
        description="For each scale, sample --per-class images of each class, with the same seed at every scale; "
                    "the dataset's clean classifier (ddpm train-classifier, never the guide) judges whether each is of "
                    "the class asked for; FID, precision and recall are against the test split. Writes "
                    "OUT/guidance-sweep.json and .png.",
    )
    sweep.add_argument("run", type=Path, help="run directory (latest checkpoint) or a checkpoint file")
    sweep.add_argument("--kind", required=True, choices=SWEEP_KINDS,
                       help="classifier-free: the scales are w of eq. 6 (conditional model); classifier: they are lambda")
    sweep.add_argument("--scales", type=_float_list, required=True, help="guidance scales, e.g. 0,1,2,4,8")
    sweep.add_argument("--class", dest="classes", type=_class_list, default="all", metavar="CLASSES", help=_CLASS_HELP + " (default all)")
    sweep.add_argument("--per-class", type=int, default=20, metavar="N", help="images per class and scale (default 20)")
    sweep.add_argument("--features", default="classifier", choices=FEATURE_KINDS, help="FID feature space (default: the dataset's classifier)")
    sweep.add_argument("--out", type=Path, default=None,
                       help="output folder (default RUN/guidance-KIND): guidance-sweep.json, its plot guidance-sweep.png, "
                            "and guidance-samples.png, one row of samples per scale")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_guiding_classifier_flags(sweep)
    _add_model_run_flags(sweep)
    _add_sampler_flags(sweep)
    sweep.set_defaults(handler=_cmd_guidance_sweep)


def _cmd_guidance_sweep(args: argparse.Namespace) -> int:
    from .sweeps import format_sweep_table, sweep_outputs, sweep_run

    if args.batch_size < 1 or args.per_class < 1:
        raise ConfigError("--batch-size and --per-class must be >= 1")
    if args.classifier is not None and args.kind != "classifier":
        raise ConfigError("--classifier is the guiding classifier of --kind classifier")
    if any(not 0 <= scale < float("inf") for scale in args.scales):
        raise ConfigError(f"--scales must be finite and >= 0, got {','.join(f'{scale:g}' for scale in args.scales)}")
    out = args.out or (args.run if args.run.is_dir() else args.run.parent) / f"guidance-{args.kind}"
    check_writable(sweep_outputs(out))
    kwargs = sampler_kwargs(args)
    say(f"{args.kind} guidance sweep of {args.run} over scales {', '.join(f'{scale:g}' for scale in args.scales)}: "
        f"{args.per_class} images of each class ({args.sampler}, {args.steps or 'all'} steps) per scale")
    started = time.perf_counter()
    output = sweep_run(
        args.run, out, kind=args.kind, scales=args.scales, classes=args.classes, per_class=args.per_class,
        guide_classifier_path=args.classifier, guidance_form=args.guidance_form, features=args.features,
        ema=args.ema, seed=args.seed, batch_size=args.batch_size, device=resolve_device(args.device), compile=args.compile,
        cpu_workers=args.cpu_workers, progress=not args.no_progress, **kwargs,
    )
    print(format_sweep_table(output.results))
    settings = output.settings
    guided = f"; guided by {settings['guide_classifier']}" if "guide_classifier" in settings else ""
    say(f"judged by {settings['judge']} (SHA-256 {settings['judge_sha256'][:12]}), FID on {settings['extractor']}{guided}")
    for warning in output.warnings:
        say(f"warning: {warning}")
    say(f"done in {time.perf_counter() - started:.0f} s: table {output.table}, plot {output.plot}, samples {output.grid}")
    return 0


# --- evaluation -------------------------------------------------------------------------

def _add_evaluation_commands(commands: Any) -> None:
    from .choices import DEFAULT_CLASSIFIER_EPOCHS, FEATURE_KINDS, INCEPTION_WEIGHTS_FILE, SCHEDULE_NAMES, SPLITS, VARIANCE_NAMES

    classifier = commands.add_parser(
        "train-classifier", help="train the classifier whose features FID uses (--noisy: the one that guides)",
        description="Train a small CNN on a dataset's images outside its test split, report its test accuracy, "
                    "and save it (model.safetensors + config.json).",
    )
    classifier.add_argument("--dataset", default=None, help=_HELP["dataset"] + " (default with --for: the run's)")
    classifier.add_argument("--out", type=Path, default=None,
                            help="new directory to save into (default: the cache, replacing the dataset's classifier there; "
                                 "ddpm fid, sample and train find it by dataset name, and a noisy one by schedule)")
    role = classifier.add_mutually_exclusive_group()
    role.add_argument("--noisy", action="store_true",
                      help="time-conditioned, trained on noised x_t of one schedule: the guide of form guided-diffusion")
    role.add_argument("--guide", action="store_true",
                      help="a second clean classifier (another seed): the guide of form poster, kept apart from the "
                           "FID and judge classifier so that guided samples are not scored by their guide")
    classifier.add_argument("--for", dest="for_run", type=Path, default=None, metavar="RUN",
                            help="--noisy only: train for the schedule (and dataset) of this run or checkpoint")
    classifier.add_argument("--schedule", default=None, choices=SCHEDULE_NAMES, help="--noisy only: the noise schedule (default: ddpm train's)")
    classifier.add_argument("--num-steps", type=int, default=None, help="--noisy only: T of the schedule, as the diffusion model's (default: ddpm train's)")
    classifier.add_argument("--epochs", type=int, default=DEFAULT_CLASSIFIER_EPOCHS, help=f"default {DEFAULT_CLASSIFIER_EPOCHS}")
    classifier.add_argument("--data-dir", default=None)
    classifier.add_argument("--image-size", type=int, default=None, help="folder: datasets only")
    classifier.add_argument("--channels", type=int, default=None, help="folder: datasets only")
    classifier.add_argument("--device", default="auto", choices=DEVICES)
    classifier.set_defaults(handler=_cmd_train_classifier)

    fid = commands.add_parser(
        "fid", help="FID, precision and recall of a model's samples against its dataset's splits",
        description="Sample --num images (batched), extract features, compare them with each --against split; print the "
                    "result and write it with its provenance as JSON. Finished batches are kept in OUT-STEM-work/ beside "
                    "--out, in a folder of their settings: rerun with the same arguments, an interrupted evaluation "
                    "resumes where it stopped; other settings (another sampler, --num, run) get folders of their own.",
    )
    fid.add_argument("run", type=Path, help="run directory (latest checkpoint) or a checkpoint file")
    fid.add_argument("--num", type=int, default=8192, help="generated images (default 8192, as the poster)")
    fid.add_argument("--against", type=_split_list, default=("train", "test"), help="reference splits (default train,test)")
    fid.add_argument("--features", default="classifier", choices=FEATURE_KINDS,
                     help="classifier (default): the dataset's classifier (ddpm train-classifier); inception: the standard FID Inception-v3")
    fid.add_argument("--classifier", type=Path, default=None, help="feature classifier directory (default: the dataset's cached one)")
    fid.add_argument("--inception-weights", type=Path, default=None, help=f"the file {INCEPTION_WEIGHTS_FILE} (default: cache, else download)")
    fid.add_argument("--out", type=Path, default=Path("fid.json"), help="JSON result (default fid.json)")
    fid.add_argument("--real-vs-real", action="store_true", help="also the FID of the train split against the test split: the floor")
    fid.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_run_flags(fid)
    _add_sampler_flags(fid)
    fid.set_defaults(handler=_cmd_fid, resume_with=_same_command)

    nll = commands.add_parser(
        "nll", help="negative log-likelihood bound in bits/dim (Ho et al. eq. 5, every one of the T terms)",
        description="The variational bound L_T + sum_t L_{t-1} + L_0 of a split's images in bits per dimension, with the "
                    "prior, the decoder and the per-step terms; writes them as JSON and the per-step curve as a PNG beside "
                    "it. Finished batches are kept in OUT-STEM-work/: rerun with the same arguments to resume.",
    )
    nll.add_argument("run", type=Path, help="run directory (latest checkpoint) or a checkpoint file")
    nll.add_argument("--split", default="test", choices=SPLITS, help="default test")
    nll.add_argument("--num", type=int, default=None, help="images of the split (default all; fewer: a fixed seeded subset)")
    nll.add_argument("--variance", default=None, choices=VARIANCE_NAMES,
                     help="reverse variance: beta or posterior for fixed-variance models (default beta), learned (the default "
                          "and only choice for a model trained with --learn-variance)")
    nll.add_argument("--out", type=Path, default=Path("nll.json"), help="JSON result (default nll.json); the plot goes beside it")
    nll.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_run_flags(nll)
    nll.set_defaults(handler=_cmd_nll)


def _split_list(text: str) -> tuple[str, ...]:
    from .choices import SPLITS

    splits = tuple(part.strip() for part in text.split(",") if part.strip())
    if not splits or any(split not in SPLITS for split in splits):
        raise argparse.ArgumentTypeError(f"expected comma-separated splits out of {', '.join(SPLITS)}, got {text!r}")
    return splits


def _cmd_train_classifier(args: argparse.Namespace) -> int:
    from .classifier import META_FILE, WEIGHTS_FILE, classifier_cache_dir, classifier_dir_name, train_and_cache_classifier
    from .guidance import describe_schedule

    if not args.noisy and (args.schedule or args.num_steps or args.for_run):
        raise ConfigError("--schedule, --num-steps and --for describe the noise of a --noisy classifier; add --noisy or drop them")
    if args.for_run is not None and (args.schedule or args.num_steps):
        raise ConfigError("--for takes the schedule of the run; drop --schedule and --num-steps")
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {args.epochs}")
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        raise ConfigError(f"{args.out} already exists and is not empty; choose another --out")
    dataset, geometry, schedule = _classifier_target(args)
    role = "noisy" if args.noisy else "guide" if args.guide else "features"
    directory = args.out or classifier_cache_dir() / classifier_dir_name(dataset, role, schedule)
    check_writable([directory / WEIGHTS_FILE, directory / META_FILE], what="classifier")
    kind = {"features": "classifier", "guide": "guiding classifier (poster form)",
            "noisy": f"noisy classifier (x_t, t) for the {describe_schedule(schedule.identity()) if schedule else ''}"}[role]
    say(f"training the {kind} of {dataset} for {args.epochs} epoch(s) into {directory}")
    if args.out is None and (directory / META_FILE).is_file():
        say(f"it replaces the one there, {_classifier_summary(directory / META_FILE)}; results made with that one name its hash")
    directory, report = train_and_cache_classifier(
        dataset, role=role, **geometry, schedule=schedule, device=resolve_device(args.device), out=args.out,
        epochs=args.epochs, progress=True,
    )
    noised = " noised at uniformly drawn steps" if args.noisy else ""
    say(f"test accuracy {report['test_accuracy']:.4f} on {report['test_images']} {report['dataset']} {report['test_split']} images{noised}")
    if args.noisy:
        by_index = ", ".join(f"t={index}: {value:.4f}" for index, value in report["accuracy_at_index"].items())
        say(f"accuracy at step index {by_index}")
        say(f"for the {describe_schedule(report['schedule'])}")
    say(f"trained in {report['train_seconds']:.1f} s ({report['epochs']} epochs on {report['train_images']} images, {report['device']}); "
        f"saved {directory} ({_classifier_summary(directory / META_FILE)})")
    if args.out is None:
        say("next: ddpm sample RUN --class 3 --classifier-guidance 1" if args.noisy else "next: ddpm fid RUN --sampler dpm-solver++ --steps 20")
    return 0


def _classifier_summary(meta_file: Path) -> str:
    """'SHA-256 1a2b3c4d5e6f..., test accuracy 0.977' of a saved classifier's config.json."""
    try:
        meta = json.loads(meta_file.read_text())
        return f"SHA-256 {meta['weights_sha256'][:12]}..., test accuracy {meta['report']['test_accuracy']:.3f}"
    except (OSError, ValueError, KeyError, TypeError):
        return "damaged or unreadable"


def _classifier_target(args: argparse.Namespace) -> tuple[str, dict[str, Any], Any]:
    """train-classifier's dataset, its geometry options (data_dir, image_size, channels) and
    the noise schedule (None unless --noisy): the flags', or with --for those of the run."""
    from .schedules import make_schedule

    geometry = {"data_dir": args.data_dir, "image_size": args.image_size, "channels": args.channels}
    if args.for_run is not None:
        from .checkpoint import load_run_schedule

        config, schedule = load_run_schedule(args.for_run)
        if args.dataset is not None and args.dataset != config.dataset:
            raise ConfigError(f"--dataset {args.dataset} is not the dataset of {args.for_run} ({config.dataset}); drop it")
        run_geometry = {"data_dir": config.data_dir, "image_size": config.image_size, "channels": config.channels}
        return config.dataset, {key: value if value is not None else run_geometry[key] for key, value in geometry.items()}, schedule
    if args.dataset is None:
        raise ConfigError("--dataset is needed (or --noisy --for RUN, which takes the run's)")
    if not args.noisy:
        return args.dataset, geometry, None
    defaults = TrainConfig()
    num_steps = defaults.num_steps if args.num_steps is None else args.num_steps
    return args.dataset, geometry, make_schedule(args.schedule or defaults.schedule, num_steps)


def _cmd_fid(args: argparse.Namespace) -> int:
    from .fid import load_extractor, model_fid
    from .io import write_json

    if args.out.suffix.lower() != ".json":
        raise ConfigError(f"--out must name a .json file, got {args.out}")
    if (args.features == "classifier" and args.inception_weights) or (args.features == "inception" and args.classifier):
        raise ConfigError("--classifier goes with --features classifier, --inception-weights with --features inception")
    if args.num < 2 or args.batch_size < 1:
        raise ConfigError(f"--num must be >= 2 and --batch-size >= 1, got {args.num} and {args.batch_size}")
    work_dir = args.out.with_name(args.out.stem + "-work")
    check_writable([args.out, work_dir / "generated-features" / "settings.json"])
    device = resolve_device(args.device)
    trained = _loaded(args, device)
    kwargs = _trained_sampler_kwargs(args, trained)
    extractor = load_extractor(args.features, trained.config.dataset, path=args.classifier or args.inception_weights, device=device)
    say(f"FID of {args.num} samples of {_describe_sampling(trained, kwargs, device)}, against the "
        f"{', '.join(args.against)} split(s) of {trained.config.dataset} on {extractor.name} features; "
        f"finished batches are kept in {work_dir}")
    result = model_fid(
        trained, extractor, num=args.num, against=args.against, batch_size=args.batch_size, seed=args.seed, device=device,
        work_dir=work_dir, progress=not args.no_progress, floor=args.real_vs_real, **kwargs,
    )
    write_json(args.out, result, what="FID result")
    for split, metrics in result["splits"].items():
        say(f"{split}: FID {metrics['fid']:.3f}, precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f} "
            f"({result['num_generated']} generated vs {result['reference_images'][split]} real images)")
    if args.real_vs_real:
        floor = result["real_vs_real"]
        for split, metrics in floor["splits"].items():
            say(f"floor, {floor['compared']} vs {split}: FID {metrics['fid']:.3f}, precision {metrics['precision']:.3f}, "
                f"recall {metrics['recall']:.3f} (real images only)")
    for warning in result.get("warnings", []):
        say(f"warning: {warning}")
    say(f"{result['extractor']} features (SHA-256 {result['extractor_sha256'][:12]}...); {result['wall_seconds']:.0f} s; "
        f"wrote {args.out} (with every setting)")
    return 0


def _cmd_nll(args: argparse.Namespace) -> int:
    from .checkpoint import load_trained_model
    from .figures import plot_bound_terms
    from .io import write_json
    from .likelihood import model_nll

    if args.out.suffix.lower() != ".json":
        raise ConfigError(f"--out must name a .json file, got {args.out}")
    device = resolve_device(args.device)
    trained = load_trained_model(args.run, ema=args.ema, device=device, compile=args.compile, cpu_workers=args.cpu_workers)
    result = model_nll(
        trained, split=args.split, num=args.num, batch_size=args.batch_size, seed=args.seed, variance=args.variance,
        device=device, work_dir=args.out.with_name(args.out.stem + "-work"), progress=not args.no_progress,
    )
    write_json(args.out, result, what="NLL result")
    plot = plot_bound_terms(result, args.out.with_suffix(".png"))
    settings = result["settings"]
    print(f"ddpm: {settings['dataset']} {settings['split']}, {result['num_images']} of {settings['split_images']} images: "
          f"NLL <= {result['bits_per_dim']:.4f} +- {result['standard_error']:.4f} bits/dim (standard error over images)")
    print(f"ddpm: prior {result['prior']:.3g}, decoder {result['decoder']:.4f}, steps 2..{settings['num_steps']} "
          f"{sum(result['terms']):.4f} bits/dim; variance {settings['variance']}, prediction {settings['prediction']}, "
          f"{settings['weights']} weights of {settings['checkpoint']} (step {settings['step']}), seed {settings['seed']}; "
          f"{result['wall_seconds']:.0f} s")
    print(f"ddpm: wrote {args.out} and {plot}")
    return 0


# --- figures, ablation, report ------------------------------------------------------------

def _add_experiment_commands(commands: Any) -> None:
    figures = commands.add_parser("figures", help="draw the forward or reverse process (PNG)")
    kinds = figures.add_subparsers(dest="figure", required=True, metavar="KIND")
    forward = kinds.add_parser("forward", help="x_t at evenly spaced t for a few images, per schedule, and abar_t")
    forward.add_argument("--dataset", required=True, help=_HELP["dataset"])
    forward.add_argument("--schedule", type=_name_list, default=("linear", "cosine"), help="comma-separated schedules (default linear,cosine)")
    forward.add_argument("--num-steps", type=int, default=1000, help="T (default 1000)")
    forward.add_argument("--num-images", type=int, default=4,
                         help="images: the first of each class, then the second of each, ... (default 4)")
    forward.add_argument("--frames", type=int, default=10, help="values of t per strip (default 10)")
    forward.add_argument("--data-dir", default=None)
    forward.add_argument("--seed", type=int, default=0)
    forward.add_argument("--out", type=Path, default=Path("figures"), help="folder (default figures/)")
    forward.set_defaults(handler=_cmd_figures_forward)
    reverse = kinds.add_parser("reverse", help="the denoising trajectory: x_t and predicted x0 at chosen steps")
    reverse.add_argument("run", type=Path, help="run directory (latest checkpoint, EMA weights) or a checkpoint file")
    reverse.add_argument("--num-images", type=int, default=4, help="trajectories, one pair of rows each (default 4)")
    reverse.add_argument("--frames", type=int, default=10, help="steps shown, evenly spaced over the sampler's (default 10)")
    reverse.add_argument("--seed", type=int, default=0, help="default 0")
    reverse.add_argument("--class", dest="classes", type=_class_list, default=None, metavar="CLASSES",
                         help="conditional models: the class of each trajectory, in turn: 3, 3,7 or all")
    reverse.add_argument("--device", default="auto", choices=DEVICES)
    reverse.add_argument("--out", type=Path, default=None, help="PNG path (default RUN/reverse-SAMPLER-STEPS.png)")
    _add_sampler_flags(reverse)
    reverse.set_defaults(handler=_cmd_figures_reverse)

    ablation = commands.add_parser(
        "ablation", help="train and evaluate a grid of settings (default: the poster's schedule x attention)",
        description="Train each cell of the grid into OUT/<cell> (OUT/<schedule>-<attn|noattn> for the poster's; a "
        "finished run is skipped, an unfinished one resumed), then FID, precision and recall against train and test on "
        "the features of the dataset's classifier (ddpm train-classifier), and with --nll-images the NLL bound. "
        "Writes OUT/ablation.json.",
    )
    ablation.add_argument("--config", type=Path, help="TOML file of TrainConfig keys shared by every run (e.g. a smaller model)")
    ablation.add_argument("--dataset", default=None, help=_HELP["dataset"])
    ablation.add_argument("--epochs", type=int, default=None, help="training epochs of every run")
    ablation.add_argument("--schedules", type=_name_list, default=None, help="default linear,cosine")
    ablation.add_argument("--attention", type=_name_list, default=None, help="on, off, or both as on,off (default on,off)")
    ablation.add_argument("--grid", type=_grid_axis, nargs="+", default=None, metavar="KEY=V1,V2",
                          help="the grid instead of --schedules x --attention: TrainConfig keys (or attention=on,off) and "
                               "their values, e.g. prediction=eps,v learn_variance=false,true (tuples as 1/2/2); "
                               "every combination is one run")
    ablation.add_argument("--fid-seeds", type=_int_list, default=None,
                          help="sampling seeds, --num-fid samples each; the table gives mean +- sd (default: the config's seed)")
    ablation.add_argument("--nll-images", type=int, default=0,
                          help="images of each --nll-splits split for the NLL bound, all T steps (0, the default: no NLL)")
    ablation.add_argument("--nll-splits", type=_split_list, default=("test",), help="default test")
    ablation.add_argument("--num-fid", type=int, default=8192, help="generated images per FID (default 8192, the poster's)")
    ablation.add_argument("--fid-batch-size", type=int, default=256, help="images per sampling batch")
    ablation.add_argument("--out", type=Path, required=True, help="folder of the runs and ablation.json")
    ablation.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_sampler_flags(ablation)
    ablation.set_defaults(handler=_cmd_ablation, resume_with=_same_command)

    report = commands.add_parser("report", help="one self-contained HTML page (and Markdown) of a folder of runs")
    report.add_argument("runs", type=Path, help="folder with runs, ablation.json files and figures")
    report.add_argument("--out", type=Path, default=None, help="folder for report.html and report.md (default RUNS)")
    report.set_defaults(handler=_cmd_report)


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _cmd_figures_forward(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .figures import across_classes, forward_process_figure
    from .schedules import make_schedule

    if args.num_images < 1 or args.frames < 1:
        raise ConfigError("--num-images and --frames must be >= 1")
    schedules = [make_schedule(name, args.num_steps) for name in args.schedule]
    check_writable([args.out / f"forward-{name}.png" for name in args.schedule] + [args.out / "alpha-bars.png"])
    dataset = load_dataset(args.dataset, "train", data_dir=args.data_dir)
    chosen = across_classes(dataset.labels, args.num_images)
    if len(chosen) < args.num_images:
        say(f"the {dataset.info.name} train split has only {len(chosen)} images; showing them all")
    for path in forward_process_figure(dataset.images[chosen], schedules, args.out, num_frames=args.frames, seed=args.seed):
        say(f"wrote {path}")
    return 0


def _cmd_figures_reverse(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_trained_model
    from .fid import fid_settings
    from .figures import reverse_process_figure
    from .guidance import num_guided_classes, resolve_classes

    if args.num_images < 1 or args.frames < 1:
        raise ConfigError("--num-images and --frames must be >= 1")
    device = resolve_device(args.device)
    trained = load_trained_model(args.run, ema=True, device=device)
    kwargs = _trained_sampler_kwargs(args, trained)
    run_dir = args.run if args.run.is_dir() else trained.path.parent.parent
    out = args.out or run_dir / f"reverse-{args.sampler}-{args.steps or trained.schedule.num_steps}.png"
    check_writable([out])
    labels = None
    if args.classes is not None:
        classes = resolve_classes(args.classes, num_guided_classes(trained.model, None))
        labels = torch.tensor([classes[k % len(classes)] for k in range(args.num_images)], dtype=torch.int64)
    settings = {**fid_settings(trained, seed=args.seed, batch_size=args.num_images, **kwargs),
                **({"labels": labels.tolist()} if labels is not None else {})}
    say(f"the reverse process of {args.num_images} sample(s) of {_describe_sampling(trained, kwargs, device)}")
    path = reverse_process_figure(
        trained.model, trained.schedule, trained.image_shape, out, num_images=args.num_images,
        num_frames=args.frames, seed=args.seed, settings=settings, labels=labels, **kwargs,
    )
    say(f"wrote {path}")
    return 0


def _grid_axis(text: str) -> tuple[str, tuple[Any, ...]]:
    """KEY=V1,V2,... of --grid: a TrainConfig key (or attention) and its values, parsed by the key's type."""
    key, equals, values = text.partition("=")
    key = key.strip().replace("-", "_")
    if not equals or not values.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE1,VALUE2,..., got {text!r}")
    if key == "attention":
        return key, _name_list(values)
    annotation = typing.get_type_hints(TrainConfig).get(key)
    if annotation is None:
        raise argparse.ArgumentTypeError(f"unknown grid key {key!r}; TrainConfig keys ({', '.join(field_names())}) or attention")
    if annotation is bool:
        parse: Callable[[str], Any] = _true_or_false
    elif _parser_for(annotation) is _int_list:
        parse = lambda value: _int_list(value.replace("/", ","))  # noqa: E731 (a tuple's items are /-separated)
    else:
        parse = _parser_for(annotation)
    try:
        return key, tuple(parse(value.strip()) for value in values.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key}: cannot read {values!r} as values of that key") from None


def _true_or_false(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def _cmd_ablation(args: argparse.Namespace) -> int:
    from .ablation import ABLATION_FILE, POSTER_GRID, read_ablation, run_ablation
    from .choices import ATTENTION_SWITCHES
    from .report import details_table, text_table

    if args.num_fid < 2 or args.fid_batch_size < 1 or args.nll_images < 0:
        raise ConfigError("--num-fid must be >= 2, --fid-batch-size >= 1 and --nll-images >= 0")
    if args.grid is not None and (args.schedules or args.attention):
        raise ConfigError("--grid replaces --schedules and --attention; give them as grid keys: schedule=linear,cosine attention=on,off")
    grid = dict(args.grid or ())
    if args.grid is not None and len(grid) < len(args.grid):
        raise ConfigError("--grid names a key twice")
    grid = grid or {"schedule": args.schedules or POSTER_GRID["schedule"], "attention": args.attention or POSTER_GRID["attention"]}
    if "attention" in grid and not set(grid["attention"]) <= set(ATTENTION_SWITCHES):
        raise ConfigError(f"--attention takes on, off or on,off, got {','.join(grid['attention'])}")
    base = resolve_config(args.config, {"dataset": args.dataset, "epochs": args.epochs})
    check_writable([args.out / ABLATION_FILE])
    started = time.perf_counter()
    rows = run_ablation(
        base, args.out, grid=grid, num_fid=args.num_fid, sampling=sampler_kwargs(args), seeds=args.fid_seeds or (base.seed,),
        batch_size=args.fid_batch_size, nll_images=args.nll_images, nll_splits=args.nll_splits,
        device=resolve_device(base.device), progress=not args.no_progress,
    )
    print(text_table(details_table(read_ablation(args.out / ABLATION_FILE))))
    say(f"{len(rows)} combination(s) in {(time.perf_counter() - started) / 60:.1f} min; table {args.out / ABLATION_FILE}")
    say(f"next: ddpm report {shlex.quote(str(args.out))}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import REPORT_HTML, REPORT_MD, write_report

    out = args.out or args.runs
    check_writable([out / REPORT_HTML, out / REPORT_MD])
    for path in write_report(args.runs, args.out):
        say(f"wrote {path}")
    return 0


# --- diffusers in and out ---------------------------------------------------------------------

def _add_interop_commands(commands: Any) -> None:
    from .choices import VARIANCE_NAMES

    imported = commands.add_parser(
        "import-diffusers", help="a diffusers DDPM (UNet2DModel + DDPMScheduler) as a ddpmkit run",
        description="Write a diffusers model folder (config.json + diffusion_pytorch_model.safetensors [+ scheduler_config.json]), "
                    "a pipeline folder (unet/, scheduler/) or a Hub repo id as a run directory that every ddpm command reads. "
                    "Reads JSON and safetensors only; weights only in .bin (pickle) files are refused.",
    )
    imported.add_argument("source", help="diffusers folder, or a Hub repo id such as google/ddpm-cifar10-32 (pip install 'ddpmkit[hub]')")
    imported.add_argument("--out", type=Path, required=True, help="run directory to create")
    imported.add_argument("--dataset", required=True, help="the data the model was trained on, which ddpm fid compares with: " + _HELP["dataset"])
    imported.add_argument("--data-dir", default=None)
    imported.set_defaults(handler=_cmd_import_diffusers)

    exported = commands.add_parser(
        "export-diffusers", help="a run as a folder that diffusers' DDPMPipeline.from_pretrained loads",
        description="Write model_index.json, unet/ (config.json, diffusion_pytorch_model.safetensors) and scheduler/ "
                    "(a DDPMScheduler that samples as ddpm sample --sampler ddpm does with the same --variance and clipping).",
    )
    exported.add_argument("run", type=Path, help="run directory (latest checkpoint) or a checkpoint file")
    exported.add_argument("--out", type=Path, required=True, help="folder to create")
    exported.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights (default) or raw")
    exported.add_argument("--variance", default="beta", choices=VARIANCE_NAMES,
                          help="the scheduler's variance_type: beta = fixed_large (default), posterior = fixed_small")
    exported.add_argument("--no-clip", dest="clip_denoised", action="store_false", help="clip_sample false (x0 not clipped to [-1, 1])")
    exported.set_defaults(handler=_cmd_export_diffusers)


def _cmd_import_diffusers(args: argparse.Namespace) -> int:
    from .interop import import_diffusers

    imported = import_diffusers(args.source, args.out, dataset=args.dataset, data_dir=args.data_dir)
    weights = "EMA weights from unet_ema/, raw from unet/" if imported.separate_ema else "one set of weights, as both EMA and raw"
    print(f"ddpm: imported {args.source} into {imported.run_dir} ({imported.checkpoint.name}, {weights})")
    if not imported.scheduler_found:
        print("ddpm: the source has no scheduler config; DDPMScheduler's defaults were used (linear 1e-4 .. 0.02, 1000 steps)")
    flags = imported.sampler_flags()
    if flags:
        print(f"ddpm: its scheduler samples as: ddpm sample {imported.run_dir} {' '.join(flags)}")
    return 0


def _cmd_export_diffusers(args: argparse.Namespace) -> int:
    from .interop import export_diffusers

    out = export_diffusers(args.run, args.out, ema=args.ema, variance=args.variance, clip_denoised=args.clip_denoised)
    print(f"ddpm: wrote {out} ({'EMA' if args.ema else 'raw'} weights); in Python: diffusers.DDPMPipeline.from_pretrained({str(out)!r})")
    return 0
