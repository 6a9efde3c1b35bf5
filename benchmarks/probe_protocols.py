"""Wall time and top-1 of the two linear-probe protocols on the same probe (model, data, epochs, seed).

``cached`` is timed from a cold cache (its one extraction pass included), ``mae`` runs the frozen
backbone every epoch. Without a --model, a random-weights ViT the size of the project's small teacher
(12 blocks, width 128, patch 7 on 28x28) is saved to a temporary folder. Run it on an idle machine.

Example:
    python benchmarks/probe_protocols.py --data mnist-5k --epochs 20
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import timm
import torch

from wecolora.evaluation.probe import probe
from wecolora.teachers.vit import model_args


def random_teacher(folder: Path) -> str:
    """Save a random-weights 12-block ViT for 28x28 images and return its ``local-dir:`` spec."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7,
                              embed_dim=128, depth=12, num_heads=4, num_classes=0)  # fmt: skip
    timm.models.save_for_hf(model, folder, safe_serialization=True, model_args=model_args(model))
    return f"local-dir:{folder}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model spec (default: a random-weights 12-block ViT)")
    parser.add_argument("--data", default="mnist-5k")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or random_teacher(tmp / "model")
        common = dict(epochs=args.epochs, batch_size=args.batch_size, device=args.device,
                      num_workers=args.num_workers, cache_dir=str(tmp / "cache"))  # fmt: skip
        results = {}
        for protocol in ("cached", "mae"):
            start = time.perf_counter()
            results[protocol] = probe(model, args.data, str(tmp / protocol), protocol=protocol, **common)
            results[protocol]["wall"] = time.perf_counter() - start
        start = time.perf_counter()
        warm = probe(model, args.data, str(tmp / "warm"), protocol="cached", **common)
        warm_wall = time.perf_counter() - start

    cached, mae = results["cached"], results["mae"]
    print(f"model {model if args.model else 'random 12-block ViT, width 128'}, data {args.data}, "
          f"epochs {args.epochs}, batch {cached['batch_size']}, device {cached['device']}, "
          f"{cached['n_train']} train / {cached['n_test']} test images")
    for name, r in (("cached (cold cache)", cached), ("mae", mae)):
        print(f"{name:>20}: {r['wall']:8.1f} s wall   top1 {100 * r['top1']:6.2f}%")
    print(f"{'cached (warm cache)':>20}: {warm_wall:8.1f} s wall   top1 {100 * warm['top1']:6.2f}%")
    print(f"wall-time ratio cached/mae = {cached['wall'] / mae['wall']:.4f} "
          f"(cached {mae['wall'] / cached['wall']:.1f}x faster); "
          f"top-1 difference {100 * abs(cached['top1'] - mae['top1']):.2f} points")


if __name__ == "__main__":
    main()
