"""FID against the number of model evaluations (NFE), for each sampler.

For a trained run, samples ``--num`` images with each sampler at each NFE, scores them
with the cached FID classifier of the run's dataset against its test split, and writes
``fid_vs_nfe.json`` (one row per sampler and NFE: FID, precision, recall, wall time)
and ``fid_vs_nfe.png`` (FID and wall time against NFE, log x-axis).

    python benchmarks/fid_vs_nfe.py runs/demo --num 1000 --out runs/demo/fid-vs-nfe
    python benchmarks/fid_vs_nfe.py runs/demo --samplers ddim,dpm-solver++ --nfe 10,20,50 \\
        --spacings uniform,quadratic,trailing      # to choose the default spacing

Every configuration draws the same initial noise (same seed and batch size), so the
rows differ only by the sampler. Finished configurations are kept in OUT/work and
skipped when the script is run again with the same arguments (their rows, wall time
included, are read back from OUT/work). Needs a classifier:
``ddpm train-classifier --dataset <dataset of the run>``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ddpmkit.checkpoint import load_trained_model  # noqa: E402
from ddpmkit.config import model_output_options  # noqa: E402
from ddpmkit.data import load_dataset  # noqa: E402
from ddpmkit.fid import compute_fid, load_extractor, reference_features  # noqa: E402
from ddpmkit.samplers import SAMPLER_NAMES, SPACING_NAMES, sample_batches  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run directory or checkpoint")
    parser.add_argument("--num", type=int, default=1000, help="samples per configuration")
    parser.add_argument("--nfe", default="10,20,50,100,250,1000")
    parser.add_argument("--samplers", default=",".join(SAMPLER_NAMES))
    parser.add_argument("--spacings", default="trailing", help=f"comma-separated, of {', '.join(SPACING_NAMES)}")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default RUN/fid-vs-nfe")
    args = parser.parse_args()

    trained = load_trained_model(args.run, ema=True)
    output = model_output_options(trained.config)  # the model's prediction target and variance
    dataset = trained.config.dataset
    out = args.out or (Path(args.run) / "fid-vs-nfe")
    out.mkdir(parents=True, exist_ok=True)
    extractor = load_extractor("classifier", dataset)
    test = load_dataset(dataset, "test", data_dir=trained.config.data_dir)
    reference = reference_features(test, extractor)
    rows = []
    # Cheap configurations first, so that an interrupted run has every sampler at small NFE.
    for nfe in (int(n) for n in args.nfe.split(",")):
        for spacing in args.spacings.split(","):
            for sampler in args.samplers.split(","):
                work = out / "work" / f"{sampler}-{spacing}-{nfe}"
                finished = work / "row.json"
                measured = json.loads(finished.read_text()) if finished.exists() else None
                if measured is not None and measured["num"] == args.num:
                    rows.append(measured)
                else:
                    settings = dict(checkpoint=str(trained.path), step=trained.step, sampler=sampler, steps=nfe, spacing=spacing, seed=args.seed, batch_size=args.batch_size, **output)
                    started = time.perf_counter()

                    def generate(start_batch: int, sampler: str = sampler, nfe: int = nfe, spacing: str = spacing):
                        return sample_batches(
                            trained.model, trained.schedule, args.num, args.batch_size, trained.image_shape,
                            seed=args.seed, start_batch=start_batch, sampler=sampler, steps=nfe, spacing=spacing, **output,
                        )

                    result = compute_fid(generate, args.num, extractor, [reference], settings=settings, work_dir=work)
                    scores = result["splits"][reference.name]
                    rows.append({"sampler": sampler, "spacing": spacing, "nfe": nfe, "num": args.num, **scores, "seconds": time.perf_counter() - started})
                    finished.write_text(json.dumps(rows[-1]))
                row = rows[-1]
                print(f"{sampler:13s} {spacing:9s} NFE {nfe:5d}  FID {row['fid']:8.3f}  precision {row['precision']:.3f}  recall {row['recall']:.3f}  {row['seconds']:7.1f} s", flush=True)
                (out / "fid_vs_nfe.json").write_text(json.dumps({"run": str(trained.path), "num": args.num, "reference": reference.name, **extractor.provenance(), "rows": rows}, indent=2))
    print(f"wrote {out / 'fid_vs_nfe.json'} and {plot(rows, out / 'fid_vs_nfe.png')}")
    print("(the seconds of a configuration interrupted and resumed count only its last part)")


def plot(rows: list[dict], path: Path) -> Path:
    figure, (fid_axis, time_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({(row["sampler"], row["spacing"]) for row in rows}):
        chosen = [row for row in rows if (row["sampler"], row["spacing"]) == key]
        label = " ".join(key)
        fid_axis.plot([row["nfe"] for row in chosen], [row["fid"] for row in chosen], marker="o", label=label)
        time_axis.plot([row["nfe"] for row in chosen], [row["seconds"] for row in chosen], marker="o", label=label)
    for axis, name in ((fid_axis, "FID (classifier features, test split)"), (time_axis, "wall time (s)")):
        axis.set_xscale("log")
        axis.set_xlabel("model evaluations (NFE)")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    fid_axis.set_yscale("log")
    fid_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


if __name__ == "__main__":
    main()
