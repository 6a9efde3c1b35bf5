"""Turn a finished ``wecolora pretrain`` run into a bundled teacher asset: fp16 weights, checked after reloading.

The asset is a timm folder (``config.json`` + ``model.safetensors``) whose weights are stored in fp16 and
load into an fp32 model, as ``assets/teacher`` does. The script refuses to write an asset over the size
limit or one whose reloaded features drift from the run's fp32 model.

Usage:
    python scripts/bundle_teacher.py runs/teacher-mae src/wecolora/assets/teacher-mae --data fashion-mnist
    wecolora knn --model bundled-mae --data fashion-mnist --output runs/teacher-mae/knn   # numbers for RECIPE.md
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from wecolora.data.augment import resize_normalize
from wecolora.data.datasets import ArrayDataset, open_dataset
from wecolora.data.transforms import eval_transform
from wecolora.export import save_student
from wecolora.teachers.load import load_model

MAX_BYTES = 8 * 2**20  # package size budget of one bundled teacher


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished pretrain run folder (its model/ is read) or a timm model folder")
    parser.add_argument("asset", help="destination folder, e.g. src/wecolora/assets/teacher-mae")
    parser.add_argument("--data", default="fashion-mnist", help="images to compare fp32 and fp16 features on")
    parser.add_argument("--atol", type=float, default=0.05, help="largest feature difference allowed (default 0.05)")
    args = parser.parse_args(argv)

    model = load_model(args.run).float().eval()
    save_student(copy.deepcopy(model).half(), args.asset)  # save_for_hf writes the tensors as they are: fp16
    size = sum(f.stat().st_size for f in Path(args.asset).iterdir())
    reloaded = load_model(f"local-dir:{args.asset}").float().eval()  # fp16 values into an fp32 model

    test = open_dataset(args.data, "test")
    cfg = model.pretrained_cfg
    images = resize_normalize(torch.tensor(test.images[:512]), model.patch_embed.img_size[0],
                                      cfg["mean"], cfg["std"]) if isinstance(test, ArrayDataset) else \
        torch.stack([eval_transform(model)(test[i][0]) for i in range(min(512, len(test)))])
    with torch.no_grad():
        diff = (model.forward_features(images) - reloaded.forward_features(images)).abs().max().item()
    print(f"{args.asset}: {size / 2**20:.2f} MB, {sum(p.numel() for p in reloaded.parameters()) / 1e6:.2f}M "
          f"parameters, fp32 vs fp16-stored features max |diff| {diff:.2g} on {len(images)} {args.data} test images; "
          f"mean {cfg['mean'][0]:.4f} std {cfg['std'][0]:.4f}")
    if size > MAX_BYTES or not diff <= args.atol:
        print(f"error: the asset is over {MAX_BYTES / 2**20:.0f} MB or its features drift more than {args.atol}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
