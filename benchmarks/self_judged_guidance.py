"""How much a guided sample flatters its own guide: the poster-form guidance sweep scored by
the guiding classifier itself instead of an independent judge.

``ddpm guidance-sweep RUN --kind classifier --guidance-form poster`` guides with the dataset's
"guide" classifier (``ddpm train-classifier --guide``, seed 1) and judges, and takes FID on,
the FID classifier (seed 0). This script draws the very same samples (same seed, sampler and
batches) and scores them with the guide: its accuracy, and FID, precision and recall on its
features against the test split. That was the sweep's own setup before the judge was kept
apart from the guide, when one clean classifier did both (README, "Guidance").

    python benchmarks/self_judged_guidance.py runs/demo --scales 0,50,100,200,400
"""

from __future__ import annotations

import argparse
import time

from ddpmkit.checkpoint import load_trained_model
from ddpmkit.classifier import load_guiding_classifier
from ddpmkit.data import load_dataset
from ddpmkit.fid import classifier_extractor, reference_features
from ddpmkit.sweeps import format_sweep_table, guidance_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory (latest checkpoint, EMA weights)")
    parser.add_argument("--scales", default="0,50,100,200,400", help="lambda of the poster form")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    args = parser.parse_args()

    started = time.perf_counter()
    trained = load_trained_model(args.run)
    config = trained.config
    guide, guide_path, meta = load_guiding_classifier(config.dataset, "poster", schedule=trained.schedule)
    guide_features = classifier_extractor(guide_path)
    test = load_dataset(config.dataset, "test", data_dir=config.data_dir, image_size=config.image_size,
                        channels=config.channels, seed=config.seed)
    results = guidance_sweep(
        trained.model, trained.schedule, trained.image_shape, kind="classifier",
        scales=[float(scale) for scale in args.scales.split(",")], classes=list(range(test.info.num_classes)),
        per_class=args.per_class, judge=guide, extractor=guide_features, reference=reference_features(test, guide_features),
        seed=0, batch_size=256, sampler="ddim", steps=args.steps, guide_classifier=guide, guidance_form="poster",
    )
    print(format_sweep_table(results))
    print(f"judged by, and FID on the features of, the guide itself: {guide_path} (SHA-256 {meta['weights_sha256'][:12]}); "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
