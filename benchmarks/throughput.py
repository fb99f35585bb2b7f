"""Training and sampling throughput of ddpmkit's UNet next to diffusers' UNet2DModel.

Both models in the poster's configuration (channels 64/128/128, 2 ResBlocks per level,
self-attention at the middle level, 28x28x1), same machine, same run. Each measurement
runs in a fresh subprocess so that peak RSS belongs to it alone. Prints a table and
writes benchmarks/results/throughput.json.

    .venv/bin/python benchmarks/throughput.py            # needs `pip install diffusers`
    .venv/bin/python benchmarks/throughput.py --quick    # fewer iterations
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def build(kind: str, channels_last: bool = False):
    import torch

    if kind == "ddpmkit":
        from ddpmkit.unet import UNet

        model = UNet(in_channels=1, base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=2, attention_levels=(1,))
    else:
        from diffusers import UNet2DModel

        model = UNet2DModel(
            sample_size=28, in_channels=1, out_channels=1, block_out_channels=(64, 128, 128), layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
        )
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def call(model, kind: str, x, t):
    out = model(x, t)
    return out.sample if kind == "diffusers" else out


def flops_per_image(kind: str) -> float:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = build(kind).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.randint(0, 1000, (2,))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        call(model, kind, x, t)
    return counter.get_total_flops() / 2


def matmul_ceiling() -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        best = max(best, 10 * 2 * 2048**3 / (time.perf_counter() - start))
    return best / 1e9


def measure(kind: str, mode: str, batch: int, iterations: int, channels_last: bool) -> dict:
    """One measurement in this process (called in a subprocess by main)."""
    import resource

    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = build(kind, channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 1, 28, 28).to(memory_format=memory_format)
    t = torch.randint(0, 1000, (batch,))
    if mode == "train":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        noise = torch.randn_like(x)

        def step():
            loss = F.mse_loss(call(model, kind, x, t), noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            with torch.inference_mode():
                call(model, kind, x, t)

    step()  # warm-up
    step()
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    seconds = time.perf_counter() - start
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"images_per_s": batch * iterations / seconds, "peak_rss_mib": peak_rss_mib}


def run_child(*args: str) -> dict:
    output = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--channels-last", action="store_true", help="measure ddpmkit with channels_last too")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "MODE", "BATCH", "ITERS"), help=argparse.SUPPRESS)
    parser.add_argument("--child-channels-last", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, mode, batch, iterations = args.child
        print(json.dumps(measure(kind, mode, int(batch), int(iterations), args.child_channels_last)))
        return

    import torch

    ceiling = matmul_ceiling()
    train_iters, sample_iters = (3, 2) if args.quick else (10, 5)
    rows = []
    for kind in ("diffusers", "ddpmkit"):
        flops = flops_per_image(kind)
        params = sum(p.numel() for p in build(kind).parameters())
        train = run_child(kind, "train", "64", str(train_iters))
        sample = run_child(kind, "sample", "256", str(sample_iters))
        train_memory = run_child(kind, "train", "128", "1")
        sample_memory = run_child(kind, "sample", "1024", "1")
        rows.append({
            "model": kind, "params_m": params / 1e6, "gflop_per_image": flops / 1e9,
            "train_images_per_s": train["images_per_s"], "sample_images_per_s": sample["images_per_s"],
            # training costs ~3x the forward FLOPs (forward + backward for inputs and weights)
            "train_gflop_s": 3 * flops * train["images_per_s"] / 1e9, "sample_gflop_s": flops * sample["images_per_s"] / 1e9,
            "peak_rss_train_b128_mib": train_memory["peak_rss_mib"], "peak_rss_sample_b1024_mib": sample_memory["peak_rss_mib"],
        })
    base, ours = rows
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 matmul ceiling {ceiling:.0f} GFLOP/s")
    header = f"{'':28}{'diffusers':>12}{'ddpmkit':>12}{'ratio':>8}"
    print(header)
    for key, label in [("params_m", "parameters (M)"), ("gflop_per_image", "GFLOP / image forward"),
                       ("train_images_per_s", "train img/s (b64)"), ("sample_images_per_s", "sample fwd img/s (b256)"),
                       ("train_gflop_s", "train GFLOP/s"), ("sample_gflop_s", "sample GFLOP/s"),
                       ("peak_rss_train_b128_mib", "peak RSS train b128 (MiB)"), ("peak_rss_sample_b1024_mib", "peak RSS sample b1024 (MiB)")]:
        print(f"{label:28}{base[key]:12.2f}{ours[key]:12.2f}{ours[key] / base[key]:8.2f}")
    for row in rows:
        print(f"{row['model']}: train {100 * row['train_gflop_s'] / ceiling:.0f}% and sampling {100 * row['sample_gflop_s'] / ceiling:.0f}% of the matmul ceiling")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps({"matmul_ceiling_gflop_s": ceiling, "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
