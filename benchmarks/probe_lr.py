"""Linear-probe top-1 of MAE's LARS head against the lr and the batch, on fixed CLS features.

Reproduces the table behind the probe's defaults (docs/evaluation.md): the bundled teacher's cached CLS
features of mnist-5k, the head trained with a fixed lr and batch (no sweep) on all 4,000 training images
for 50 epochs, and on 100 a class for 20 epochs. Seconds on 2 cores; run it on an idle machine.

Example:
    python benchmarks/probe_lr.py --model bundled
"""
from __future__ import annotations

import argparse


from wecolora.data.subset import few_shot_indices
from wecolora.data.transforms import eval_transform
from wecolora.evaluation.probe import probe_config, train_linear_probe
from wecolora.evaluation.splits import open_split, split_features
from wecolora.teachers.load import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--data", default="mnist-5k")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.2, 1, 4, 16, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[512, 256, 128, 64])
    args = parser.parse_args()

    model = load_model(args.model)
    transform = eval_transform(model)
    train_ds, test_ds = open_split(args.data, "train", transform), open_split(args.data, "test", transform)
    train, test = split_features(model, train_ds, test_ds, data=args.data, pooling="cls", cache_dir=None,
                                 batch_size=500, device="cpu", num_workers=0)
    for per_class, epochs in ((None, 50), (100, 20)):
        chosen = list(range(len(train.labels))) if per_class is None else few_shot_indices(
            train.labels.tolist(), per_class=per_class, seed=0)
        for batch in args.batches:
            for lr in args.lrs:
                result = train_linear_probe(train.features[chosen], train.labels[chosen], test.features, test.labels,
                                            num_classes=10, config=probe_config(epochs=epochs, lr=lr, batch_size=batch))
                print(f"{args.model} {args.data} train {len(chosen)} epochs {epochs} batch {batch} lr {lr:g}: "
                      f"top-1 {100 * result['top1']:.1f}%", flush=True)


if __name__ == "__main__":
    main()
