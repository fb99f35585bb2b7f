"""The time of one training step of the demo-size UNet under each objective (README, "Objectives").

The objectives grid gives every cell the same number of optimizer steps; this says how much
wall-clock time a step of each objective costs, so that "the same steps" can be read as "the
same budget". One optimizer step as training does it on a CPU (the batch of 64 split over
one worker thread per core, fused Adam; without the gradient clipping, which costs every objective alike), measured *interleaved*: each repeat times every
objective in turn, so that load from other programs slows all of them alike; prints the
median seconds per step and the ratio to eps + MSE.

    .venv/bin/python benchmarks/objective_step_time.py --repeats 5 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ddpmkit.batch_threads import backward_in_slices, resolve_cpu_workers
from ddpmkit.demo import DEMO_CONFIG
from ddpmkit.objectives import ddpm_loss
from ddpmkit.schedules import make_schedule
from ddpmkit.training import model_config_for, objective_options
from ddpmkit.unet import UNet

OBJECTIVES = {
    "eps": {},
    "eps, min-snr": {"loss_weighting": "min-snr"},
    "v": {"prediction": "v"},
    "v, min-snr": {"prediction": "v", "loss_weighting": "min-snr"},
    "learned variance (hybrid)": {"learn_variance": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per objective and repeat")
    args = parser.parse_args()
    schedule = make_schedule(DEMO_CONFIG.schedule, DEMO_CONFIG.num_steps)
    workers = resolve_cpu_workers(0, on_cpu=True)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (DEMO_CONFIG.batch_size, 1, 28, 28), generator=generator) / 127.5 - 1
    t = torch.randint(0, schedule.num_steps, (DEMO_CONFIG.batch_size,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    steps = {}
    for name, changes in OBJECTIVES.items():
        config = DEMO_CONFIG.replace(**changes)
        torch.manual_seed(0)
        model = UNet.from_config(model_config_for(config, 1, 10))
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)

        def step(model=model, optimizer=optimizer, options=objective_options(config)) -> None:
            def slice_loss(rows: slice) -> torch.Tensor:
                return ddpm_loss(model, schedule, x0[rows], t[rows], noise[rows], reduction="sum", **options) / noise.numel()

            backward_in_slices(slice_loss, len(x0), list(model.parameters()), workers)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up: the first call compiles the GroupNorm kernels
        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in OBJECTIVES}
    for _ in range(args.repeats):
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - started) / args.steps)
    baseline = statistics.median(times["eps"])
    print(f"{'objective':28s} {'s/step (median)':>16s} {'min':>7s} {'max':>7s} {'vs eps':>7s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:28s} {median:16.3f} {min(values):7.3f} {max(values):7.3f} {median / baseline:7.3f}")


if __name__ == "__main__":
    main()
