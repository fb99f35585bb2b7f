"""Ho et al. 2020's Table 1 protocol on an imported DDPM: Inception FID of 50,000 samples against the train set.

For a run written by ``ddpm import-diffusers`` (or any run), samples ``--num`` images with the
ancestral sampler over all T steps (Algorithm 2, the paper's setting) and with DDIM and
DPM-Solver++ at each of ``--steps``, and scores each set with ``ddpm fid``'s pipeline
(fid.model_fid: FID, precision and recall) against the train split. The ancestral
sampler uses the variance and clipping of the source's scheduler (the run's imported.json).
Writes OUT/reproduce.json, one row per configuration, with the published figures beside them.
Finished batches are kept in OUT/work/: rerun the same command and it resumes.

    ddpm import-diffusers google/ddpm-cifar10-32 --dataset cifar10 --out runs/ddpm-cifar10-32
    python benchmarks/reproduce_ddpm.py runs/ddpm-cifar10-32 --inception-weights pt_inception-2015-12-05-6726825d.pth
    python benchmarks/reproduce_ddpm.py RUN --quick    # end to end in seconds on a CPU (the test suite does this)

The full run needs a GPU: 50,000 samples x 1000 steps of a 35.7M-parameter UNet is 5e7 network
evaluations for the ancestral row alone. ``--quick`` is a check that the script works, not a
measurement: 16 samples, 2 and 4 steps, on the features of the dataset's classifier (ddpm
train-classifier), since the Inception weights cannot be fetched offline.

Bits/dim on the test set (Ho et al.: <= 3.75 on CIFAR-10) is the variational bound of ``ddpm
nll`` (likelihood.model_nll, all T terms) over ``--nll-images`` test images (default: all),
with the variance of the source's scheduler; ``--quick`` takes 4.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ddpmkit.checkpoint import load_trained_model
from ddpmkit.fid import load_extractor, model_fid
from ddpmkit.interop import RECORD_FILE
from ddpmkit.likelihood import model_nll

# Ho et al. 2020, Table 1 (CIFAR-10, unconditional; EMA weights; FID of 50,000 samples vs the train set).
PUBLISHED = {
    "source": "Ho et al. 2020, Table 1: CIFAR-10, 50,000 samples, Inception FID against the train set",
    "fid_train": 3.17,
    "nll_test_bits_per_dim_at_most": 3.75,
    "hub_non_ema_weights_fid_reported_by_users": "about 12",
}
QUICK = {"num": 16, "steps": "2,4", "batch_size": 16, "features": "classifier", "nll_images": 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run directory (ddpm import-diffusers writes one) or checkpoint")
    parser.add_argument("--num", type=int, default=50_000, help="samples per configuration (default 50,000, the paper's)")
    parser.add_argument("--steps", default="10,20,50,100", help="model evaluations of DDIM and DPM-Solver++ (default 10,20,50,100)")
    parser.add_argument("--samplers", default="ddim,dpm-solver++", help="the fast samplers (the ancestral row is always measured)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--features", default="inception", choices=("inception", "classifier"))
    parser.add_argument("--inception-weights", type=Path, default=None, help="pt_inception-2015-12-05-6726825d.pth (default: cache)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nll-images", type=int, default=None, help="test images of the bits/dim bound (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="default RUN/reproduce")
    parser.add_argument("--quick", action="store_true", help=f"a seconds-long check on a CPU: {QUICK}")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK, device="cpu")

    trained = load_trained_model(args.run, ema=True, device=args.device)
    record = Path(args.run) / RECORD_FILE
    ancestral = json.loads(record.read_text())["sampling"] if record.is_file() else {"variance": "beta", "clip_denoised": True}
    extractor = load_extractor(args.features, trained.config.dataset, path=args.inception_weights, device=args.device)
    out = args.out or Path(args.run) / "reproduce"
    configurations = [("ddpm", trained.schedule.num_steps, ancestral)]
    configurations += [(sampler, int(steps), {}) for steps in args.steps.split(",") for sampler in args.samplers.split(",")]
    rows = []
    for sampler, steps, options in configurations:
        result = model_fid(
            trained, extractor, num=args.num, against=("train",), batch_size=args.batch_size, seed=args.seed, device=args.device,
            work_dir=out / "work" / f"{sampler}-{steps}", sampler=sampler, steps=steps, **options,
        )
        (scores,) = result["splits"].values()  # the one reference: the train split
        rows.append({"sampler": sampler, "steps": steps, **options, **scores, "wall_seconds": result["wall_seconds"]})
        print(f"{sampler:13s} {steps:5d} steps  FID {scores['fid']:8.3f}  precision {scores['precision']:.3f}  "
              f"recall {scores['recall']:.3f}  {result['wall_seconds']:8.1f} s", flush=True)
    nll = model_nll(trained, split="test", num=args.nll_images, batch_size=args.batch_size, seed=args.seed,
                    variance=ancestral["variance"], device=args.device, work_dir=out / "work" / "nll")
    print(f"bits/dim on {nll['num_images']} test images: {nll['bits_per_dim']:.4f} (prior {nll['prior']:.4f}, "
          f"decoder {nll['decoder']:.4f}), {nll['wall_seconds']:.1f} s", flush=True)
    summary = {
        "run": str(trained.path), "num": args.num, "against": "train", "quick": args.quick, **extractor.provenance(),
        "rows": rows,
        "bits_per_dim": nll["bits_per_dim"], "nll": {key: value for key, value in nll.items() if key not in ("terms", "term_steps")},
        "published": PUBLISHED,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "reproduce.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"published (Ho et al. Table 1): FID {PUBLISHED['fid_train']} (train), NLL <= {PUBLISHED['nll_test_bits_per_dim_at_most']} "
          f"bits/dim\nwrote {out / 'reproduce.json'}")


if __name__ == "__main__":
    main()
