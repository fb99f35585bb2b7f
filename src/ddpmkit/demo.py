"""``ddpm demo``: a small model trained on mnist-5k in minutes on a CPU, then a sample grid.

The settings differ from the poster's (a smaller UNet, a larger learning rate, a fast
sampler) so that digits appear within the few minutes a demo may take on 2 cores;
the poster's own settings are in configs/.
"""

from __future__ import annotations

import time
from pathlib import Path

from .checkpoint import load_trained_model
from .config import TrainConfig
from .figures import save_image_grid
from .samplers import sample, seeded_generator
from .training import train

DEMO_CONFIG = TrainConfig(
    dataset="mnist-5k",
    base_channels=32,
    channel_mults=(1, 2, 2),
    num_res_blocks=1,
    batch_size=64,
    lr=1e-3,
    epochs=100,
    max_steps=1500,
    ema_decay=0.999,
    checkpoint_every=500,
    sample_every_epoch=0,
    fid_batches=0,
)
DEMO_SAMPLER = {"sampler": "ddim", "steps": 50}


def run_demo(run_dir: str | Path, *, max_steps: int | None = None) -> Path:
    """Train DEMO_CONFIG into run_dir, then write run_dir/samples.png (64 digits)."""
    run_dir = Path(run_dir)
    config = DEMO_CONFIG if max_steps is None else DEMO_CONFIG.replace(max_steps=max_steps)
    started = time.perf_counter()
    train(config, run_dir)
    trained = load_trained_model(run_dir, ema=True)
    images = sample(trained.model, trained.schedule, (64, *trained.image_shape), generator=seeded_generator(config.seed, 0), **DEMO_SAMPLER)
    grid = save_image_grid(images, run_dir / "samples.png", nrow=8, scale=3)
    minutes = (time.perf_counter() - started) / 60
    print(f"ddpm demo: done in {minutes:.1f} min\n  run directory: {run_dir}\n  sample grid:   {grid}")
    print(f"  more samples:  ddpm sample {run_dir} --num 64 --sampler ddim --steps 50 --out {run_dir / 'more.png'}")
    return grid
