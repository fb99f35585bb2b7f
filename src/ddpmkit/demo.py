"""``ddpm demo``: a small model trained on mnist-5k in minutes on a CPU, then a sample grid.

The settings differ from the poster's (a smaller UNet, a larger learning rate, 800 steps,
100 ancestral sampling steps) so that digits appear within the few minutes a demo may take
on 2 cores;
the poster's own settings are in configs/.
"""

from __future__ import annotations

import time
from pathlib import Path

from .checkpoint import latest_checkpoint, load_trained_model
from .config import TrainConfig, model_output_options
from .images import save_image_grid
from .rng import seeded_generator
from .samplers import sample
from .training import resolve_resume_config, train

DEMO_CONFIG = TrainConfig(
    dataset="mnist-5k",
    base_channels=16,
    channel_mults=(1, 2, 2),
    num_res_blocks=1,
    batch_size=64,
    lr=2e-3,
    epochs=100,
    max_steps=800,
    ema_decay=0.995,
    checkpoint_every=400,
    sample_every_epoch=0,
    fid_batches=0,
)
# Ancestral sampling: on a model this short-trained, DDIM and DPM-Solver++ at few steps
# leave speckled backgrounds that the fresh noise of each ancestral step washes out.
DEMO_SAMPLER = {"sampler": "ddpm", "steps": 100}


def run_demo(run_dir: str | Path, *, max_steps: int | None = None) -> Path | None:
    """Train DEMO_CONFIG into run_dir, then write run_dir/samples.png (64 digits).

    Run again, it continues an interrupted demo and only re-samples a finished one; a
    run_dir that holds another experiment is refused. Returns None when interrupted.
    """
    run_dir = Path(run_dir)
    config = DEMO_CONFIG if max_steps is None else DEMO_CONFIG.replace(max_steps=max_steps)
    started = time.perf_counter()
    resume = latest_checkpoint(run_dir) is not None
    if resume:
        config = resolve_resume_config(run_dir, config.to_dict())
    summary = train(config, run_dir, resume=resume)
    if summary.interrupted:
        print("ddpm demo: interrupted; run it again (make demo) to continue where it stopped")
        return None
    trained = load_trained_model(run_dir, ema=True)
    images = sample(
        trained.model, trained.schedule, (64, *trained.image_shape), generator=seeded_generator(config.seed, 0),
        **DEMO_SAMPLER, **model_output_options(trained.config),
    )
    grid = save_image_grid(images, run_dir / "samples.png", nrow=8, scale=3)
    minutes = (time.perf_counter() - started) / 60
    print(f"ddpm demo: done in {minutes:.1f} min\n  run directory: {run_dir}\n  sample grid:   {grid}")
    print(f"  more samples:  ddpm sample {run_dir} --num 64 --sampler ddpm --steps 100 --out {run_dir / 'more.png'}")
    return grid
