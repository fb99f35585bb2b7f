"""Training and sampling throughput of ddpmkit's UNet next to diffusers' UNet2DModel.

Both models in the poster's configuration (channels 64/128/128, 2 ResBlocks per level,
self-attention at the middle level, 28x28x1), fp32, on this machine's CPU (or the GPU
with --device cuda). Speeds are measured in this one process, *interleaved*: each repeat
times every model in turn, so that load from other programs slows all of them alike; the
table gives the median over repeats, and the ratio of the medians. Peak RSS is measured
in one fresh subprocess per case, so that peaks do not mix. Prints a table and writes
benchmarks/results/throughput.json.

Two executions of each model: "plain", one batch over torch's intra-op threads (what
diffusers does), and "+threads", the batch split over one single-threaded worker per
core, in slices of at most 64 rows for sampling (ddpmkit.batch_threads, what ddpmkit's
training and samplers do on a CPU); the same
helper runs both libraries' models, so the table separates the model from the execution.

    .venv/bin/python benchmarks/throughput.py                    # diffusers vs ddpmkit, each also on worker threads
    .venv/bin/python benchmarks/throughput.py --channels-last    # + diffusers in channels_last
    .venv/bin/python benchmarks/throughput.py --compile          # + ddpmkit under torch.compile
    .venv/bin/python benchmarks/throughput.py --sample-batches 64,256,1024   # sampling batch sizes
    .venv/bin/python benchmarks/throughput.py --profile          # where a sampling forward spends its time

diffusers is needed only here (it is in the dev environment, not a ddpmkit dependency).
gpu_check.py times its cases with this module's helpers, also in bf16 and fp16 (Case.precision)
and at toy sizes (Case.base_channels).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ddpmkit.batch_threads import BatchThreads, backward_in_slices
from ddpmkit.choices import Precision

RESULTS = Path(__file__).parent / "results"
IMAGE = (1, 28, 28)
TRAIN_BATCH, SAMPLE_BATCH = 64, 256  # the measuring batches
MEMORY_TRAIN_BATCH, MEMORY_SAMPLE_BATCH = 128, 1024  # the memory batches
POSTER_BASE_CHANNELS = 64
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build(kind: str, base_channels: int = POSTER_BASE_CHANNELS) -> torch.nn.Module:
    """The poster's configuration in either library (6.40M vs 6.47M parameters); channels
    base/2 base/2 base, so that a smaller base gives a toy of the same architecture."""
    if kind == "ddpmkit":
        from ddpmkit.unet import UNet

        return UNet(in_channels=1, base_channels=base_channels, channel_mults=(1, 2, 2), num_res_blocks=2, attention_levels=(1,))
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=(base_channels, 2 * base_channels, 2 * base_channels),
        layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=min(32, base_channels),
    )


def autocast(precision: Precision, device: str) -> AbstractContextManager[object]:
    """Mixed precision as ddpmkit's trainer runs it (Accelerate's autocast), or nothing for fp32."""
    return nullcontext() if precision == "fp32" else torch.autocast(device, dtype=_AUTOCAST_DTYPES[precision])


@dataclass
class Case:
    """One model setup under test: a library and the speed options applied to it."""

    kind: str
    channels_last: bool = False
    compile: bool = False
    workers: int = 1  # > 1: the batch split over worker threads (ddpmkit.batch_threads)
    precision: Precision = "fp32"  # bf16, fp16: autocast (fp16 with a loss scaler)
    base_channels: int = POSTER_BASE_CHANNELS
    compile_seconds: dict[str, float] = field(default_factory=dict)
    peak_cuda_mib: dict[str, float] = field(default_factory=dict)  # per mode, CUDA only

    @property
    def name(self) -> str:
        options = ((self.channels_last, "+cl"), (self.precision != "fp32", f"+{self.precision}"), (self.compile, "+compile"),
                   (self.workers > 1, "+threads"))
        return self.kind + "".join(suffix for on, suffix in options if on)

    def model(self, device: str) -> tuple[torch.nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        torch.manual_seed(0)
        model = build(self.kind, self.base_channels).to(device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        forward = torch.compile(model) if self.compile else model
        if self.kind == "diffusers":
            return model, lambda x, t: forward(x, t).sample
        return model, forward

    def inputs(self, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, *IMAGE, generator=generator).to(device)
        if self.channels_last:
            x = x.to(memory_format=torch.channels_last)
        return x, torch.randint(0, 1000, (batch,), generator=generator).to(device)


def training_step(case: Case, batch: int, device: str) -> Callable[[], None]:
    """A full training step: forward, MSE, backward, Adam (Algorithm 1's inner loop), with
    each library's optimizer as its training runs it: ddpmkit's trainer uses the fused Adam,
    diffusers' training examples torch's default. In fp16 the loss is scaled (GradScaler)."""
    model, forward = case.model(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=case.kind == "ddpmkit")
    scaler = torch.amp.GradScaler(device, enabled=case.precision == "fp16")
    x, t = case.inputs(batch, device)
    noise = torch.randn_like(x)

    def slice_loss(rows: slice) -> torch.Tensor:
        return scaler.scale(F.mse_loss(forward(x[rows], t[rows]).float(), noise[rows], reduction="sum") / noise.numel())

    def step() -> None:
        with autocast(case.precision, device):
            backward_in_slices(slice_loss, batch, list(model.parameters()), case.workers)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def sampling_forward(case: Case, batch: int, device: str) -> Callable[[], None]:
    """One denoiser call of a sampler: forward only, under inference_mode, as samplers.sample."""
    model, forward = case.model(device)
    model.eval()
    x, t = case.inputs(batch, device)
    split_forward = BatchThreads(forward, case.workers)

    def step() -> None:
        with torch.inference_mode(), autocast(case.precision, device):
            split_forward(x, t)

    return step


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[], None], iterations: int, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    synchronize(device)
    return time.perf_counter() - start


def flops_per_image(kind: str, training: bool, base_channels: int = POSTER_BASE_CHANNELS) -> float:
    """Counted FLOPs per image: a forward, or forward + backward (weights and inputs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    case = Case(kind, base_channels=base_channels)
    model, forward = case.model("cpu")
    x, t = case.inputs(2, "cpu")
    # MATH: the counter sees the attention matmuls, whichever kernel the speed run uses.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if training:
            forward(x, t).square().mean().backward()
        else:
            with torch.no_grad():
                forward(x, t)
    return counter.get_total_flops() / 2


def matmul_ceiling(device: str) -> float:
    """This machine's fp32 matmul GFLOP/s (best of 5 x 10 products of 2048^2 matrices)."""
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    for _ in range(3):
        a @ b
    best = min(timed(lambda: a @ b, 10, device) for _ in range(5))
    return 10 * 2 * 2048**3 / best / 1e9


def interleaved_speeds(cases: list[Case], mode: str, batch: int, iterations: int, repeats: int, device: str) -> dict[str, list[float]]:
    """images/s of every case, per repeat; within a repeat the cases run one after another.

    On CUDA each case's peak memory (its model, optimizer state and the activations of its
    first two steps, above what was allocated before it was built) goes to peak_cuda_mib."""
    make = training_step if mode == "train" else sampling_forward
    steps = {}
    for case in cases:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            allocated_before = torch.cuda.memory_allocated()
        steps[case.name] = make(case, batch, device)
        start = time.perf_counter()
        steps[case.name]()  # warm-up; with torch.compile this call compiles
        case.compile_seconds[mode] = time.perf_counter() - start
        steps[case.name]()
        if device == "cuda":
            case.peak_cuda_mib[mode] = (torch.cuda.max_memory_allocated() - allocated_before) / 2**20
        print(f"{mode} b{batch}: {case.name} first step {case.compile_seconds[mode]:.1f} s", flush=True)
    speeds: dict[str, list[float]] = {case.name: [] for case in cases}
    for repeat in range(repeats):
        for case in cases:
            speeds[case.name].append(batch * iterations / timed(steps[case.name], iterations, device))
        # as it goes, so that a run cut short still reports something
        print(f"{mode} b{batch} repeat {repeat + 1}: " + ", ".join(f"{name} {v[-1]:.1f} img/s" for name, v in speeds.items()), flush=True)
    return speeds


def peak_rss_mib(case: Case, mode: str, batch: int, device: str) -> float:
    """Peak RSS of a fresh process that builds the model and runs one step (2 for training:
    Adam's state exists from the first)."""
    arguments = [case.kind, mode, str(batch), device, str(int(case.channels_last)), str(int(case.compile)), str(case.workers)]
    output = subprocess.run([sys.executable, __file__, "--memory-child", *arguments], capture_output=True, text=True, check=True)
    return float(output.stdout.strip().splitlines()[-1])


def memory_child(kind: str, mode: str, batch: str, device: str, channels_last: str, compile: str, workers: str) -> None:
    case = Case(kind, channels_last=bool(int(channels_last)), compile=bool(int(compile)), workers=int(workers))
    step = (training_step if mode == "train" else sampling_forward)(case, int(batch), device)
    for _ in range(2 if mode == "train" else 1):
        step()
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent at
    # fork and keeps it through exec, so every child would report at least this
    # benchmark's own peak (it did: all ten cases read 4526.5 MiB on 2026-11-29).
    # VmHWM belongs to the address space that exec made new.
    status = Path("/proc/self/status").read_text()
    print(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024)  # kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    parser.add_argument("--train-iterations", type=int, default=2, help="training steps per repeat (default 2)")
    parser.add_argument("--sample-iterations", type=int, default=1, help="sampling forwards per repeat (default 1)")
    parser.add_argument("--channels-last", action="store_true", help="also diffusers in channels_last (ddpmkit's UNet always is)")
    parser.add_argument("--compile", action="store_true", help="also ddpmkit under torch.compile (compile time reported)")
    parser.add_argument("--sample-batches", type=str, default=None, help="only sampling speed of ddpmkit at these batch sizes")
    parser.add_argument("--profile", action="store_true", help="only torch.profiler's operator table of one ddpmkit sampling forward")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--memory-child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return

    device = args.device
    if args.profile:
        profile_sampling_forward(device)
        return
    ceiling = matmul_ceiling(device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"fp32 matmul ceiling {ceiling:.0f} GFLOP/s; medians of {args.repeats} interleaved repeats", flush=True)
    if args.sample_batches:
        sample_batch_sizes(args, ceiling, device)
        return

    cases = [Case("diffusers"), Case("ddpmkit")]
    workers = torch.get_num_threads() if device == "cpu" else 1
    if workers > 1:
        cases += [Case("diffusers", workers=workers), Case("ddpmkit", workers=workers)]
    if args.channels_last:
        cases.append(Case("diffusers", channels_last=True))
    if args.compile:
        cases.append(Case("ddpmkit", compile=True))
    train = interleaved_speeds(cases, "train", TRAIN_BATCH, args.train_iterations, args.repeats, device)
    sample = interleaved_speeds(cases, "sample", SAMPLE_BATCH, args.sample_iterations, args.repeats, device)
    # Measured again after the runs: other programs' load changes it, and the higher
    # of the two keeps the fractions below conservative.
    ceiling = max(ceiling, matmul_ceiling(device))
    print(f"fp32 matmul ceiling, higher of before and after: {ceiling:.0f} GFLOP/s", flush=True)
    rows = {}
    for case in cases:
        forward_flops, training_flops = flops_per_image(case.kind, False), flops_per_image(case.kind, True)
        train_speed, sample_speed = statistics.median(train[case.name]), statistics.median(sample[case.name])
        row = {
            "parameters (M)": sum(p.numel() for p in build(case.kind).parameters()) / 1e6,
            "GFLOP / image forward": forward_flops / 1e9,
            f"train img/s (b{TRAIN_BATCH})": train_speed,
            f"sample fwd img/s (b{SAMPLE_BATCH})": sample_speed,
            "train GFLOP/s": training_flops * train_speed / 1e9,
            "sample GFLOP/s": forward_flops * sample_speed / 1e9,
            "train % of matmul ceiling": 100 * training_flops * train_speed / 1e9 / ceiling,
            "sample % of matmul ceiling": 100 * forward_flops * sample_speed / 1e9 / ceiling,
        }
        if case.compile:
            row["compile s (train / sample)"] = f"{case.compile_seconds['train']:.0f} / {case.compile_seconds['sample']:.0f}"
        if device == "cuda":
            row[f"peak CUDA train b{TRAIN_BATCH} (MiB)"] = case.peak_cuda_mib["train"]
            row[f"peak CUDA sample b{SAMPLE_BATCH} (MiB)"] = case.peak_cuda_mib["sample"]
        if not args.no_memory:
            row[f"peak RSS train b{MEMORY_TRAIN_BATCH} (MiB)"] = peak_rss_mib(case, "train", MEMORY_TRAIN_BATCH, device)
            row[f"peak RSS sample b{MEMORY_SAMPLE_BATCH} (MiB)"] = peak_rss_mib(case, "sample", MEMORY_SAMPLE_BATCH, device)
        rows[case.name] = row
    print_table(rows, "diffusers")
    for mode, speeds in (("train", train), ("sample", sample)):
        for case in cases[1:]:
            ratios = [ours / theirs for ours, theirs in zip(speeds[case.name], speeds["diffusers"])]
            print(f"{case.name} / diffusers {mode} ratio per repeat: " + " ".join(f"{r:.2f}" for r in ratios))
    RESULTS.mkdir(exist_ok=True)
    record = {"torch": torch.__version__, "device": device, "threads": torch.get_num_threads(), "matmul_ceiling_gflop_s": ceiling,
              "rows": rows, "train_images_per_s": train, "sample_images_per_s": sample}
    (RESULTS / "throughput.json").write_text(json.dumps(record, indent=2))


def profile_sampling_forward(device: str) -> None:
    """Operators of one ddpmkit sampling forward (batch SAMPLE_BATCH) by self time."""
    from torch.profiler import ProfilerActivity, profile

    step = sampling_forward(Case("ddpmkit"), SAMPLE_BATCH, device)
    step()  # warm-up: first-call allocations and oneDNN kernel choice
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as profiler:
        step()
        synchronize(device)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def sample_batch_sizes(args: argparse.Namespace, ceiling: float, device: str) -> None:
    """Sampling speed of ddpmkit's UNet at several batch sizes (the sampler's batch choice)."""
    batches = [int(b) for b in args.sample_batches.split(",")]
    case = Case("ddpmkit")
    flops = flops_per_image("ddpmkit", False)
    steps = {batch: sampling_forward(case, batch, device) for batch in batches}
    for step in steps.values():
        step()
    speeds: dict[int, list[float]] = {batch: [] for batch in batches}
    for _ in range(args.repeats):
        for batch, step in steps.items():
            # about the same images per timing at every batch size
            iterations = max(1, max(batches) // batch * args.sample_iterations)
            speeds[batch].append(batch * iterations / timed(step, iterations, device))
    for batch, values in speeds.items():
        median = statistics.median(values)
        print(f"{case.name} sample batch {batch:5d}: {median:7.1f} img/s, {100 * flops * median / 1e9 / ceiling:4.0f}% of the ceiling")


def print_table(rows: dict[str, dict[str, float | str]], baseline: str) -> None:
    names = list(rows)
    print(f"{'':30}" + "".join(f"{name:>18}" for name in names) + "".join(f"{name + '/' + baseline:>26}" for name in names if name != baseline))
    for key in dict.fromkeys(k for row in rows.values() for k in row):  # every row's keys, in order
        values = [rows[name].get(key, "") for name in names]
        cells = "".join(f"{v:18.2f}" if isinstance(v, float) else f"{v:>18}" for v in values)
        ratios = "".join(
            f"{rows[name][key] / rows[baseline][key]:26.2f}" if isinstance(rows[name].get(key), float) and isinstance(rows[baseline].get(key), float) else f"{'':26}"
            for name in names if name != baseline
        )
        print(f"{key:30}{cells}{ratios}")


if __name__ == "__main__":
    main()
