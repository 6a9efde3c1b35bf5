"""``wecolora distill`` end to end on a class folder of JPEGs, against bench's compute ceiling on the same device.

Writes N JPEGs (default 12,800 at 500 x 375, the size of a typical ImageNet photo: Fashion-MNIST images
upscaled, with noise, in 10 class folders), runs one distillation over all of them (every epoch a new
view, the teacher cache off, as a lone run) and reports its images/s per epoch (summary.csv) and its
wall time; then the ceiling: the same teacher forward and student step on batches already on the
device (``make_trainer`` + ``wecolora_epoch``: the loop distill runs, without its data path),
and the ratio distill / ceiling. Run it on an idle machine.

Examples:
    python benchmarks/distill_jpeg_folder.py --images 1024 --epochs 2                      # CPU, bundled teacher
    python benchmarks/distill_jpeg_folder.py --vit-b --device cuda --precision bf16 --batch-size 256 \\
        --images 12800 --epochs 10                                                          # the 1%-ImageNet recipe
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from tqdm.auto import tqdm

from wecolora.bench.run import make_trainer, wecolora_epoch
from wecolora.config import DistillConfig
from wecolora.data.datasets import open_dataset
from wecolora.data.views import ViewRecipe
from wecolora.method.plan import plan_student
from wecolora.runtime import resolve_device
from wecolora.teachers.load import load_model
from wecolora.teachers.vit import model_args
from wecolora.train.distill import distill


def write_jpeg_folder(folder: Path, images: int, size: tuple[int, int], seed: int = 0) -> None:
    """``images`` JPEGs of ``size`` (width, height) in 10 class folders, made from Fashion-MNIST (or noise),
    written by a thread per core (PIL encodes without the GIL); image i depends on (seed, i) only."""
    try:
        source = open_dataset("fashion-mnist", "train")
        pictures, labels = source.images, np.asarray(source.targets)
    except Exception:  # Fashion-MNIST not installed: noise with a class-dependent brightness
        pictures, labels = None, np.arange(images) % 10

    def write(i: int) -> None:
        rng = np.random.default_rng([seed, i])
        label = int(labels[i % len(labels)])
        if pictures is not None:
            base = Image.fromarray(pictures[i % len(pictures)]).convert("RGB").resize(size, Image.BICUBIC)
            pixels = np.asarray(base, dtype=np.int16) + rng.integers(-20, 21, (size[1], size[0], 3))
        else:
            pixels = rng.integers(0, 256, (size[1], size[0], 3)) // 2 + label * 12
        path = folder / f"class{label}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(tqdm(pool.map(write, range(images)), total=images, desc="writing JPEGs", unit="img"))


def random_vit_b(folder: Path) -> str:
    """A random-weights ViT-B/16 (224 px) saved as a ``local-dir:`` teacher."""
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    timm.models.save_for_hf(model, folder, safe_serialization=True, model_args=model_args(model))
    return f"local-dir:{folder}"


def ceiling(teacher_spec: str, *, device: torch.device, precision: str, batch: int, steps: int) -> float:
    """images/s of distill's loop (teacher forward + student step, r=2, all six adapters) on device-resident batches."""
    teacher = load_model(teacher_spec).requires_grad_(False).to(device)
    rank = plan_student(teacher, 2, mode="wecolora").rank
    trainer = make_trainer(teacher, mode="wecolora", reduction=2, rank=rank, precision=precision, device=device,
                                 updates_per_epoch=steps)
    recipe = ViewRecipe.for_model(teacher)
    canvas = (recipe.bound, recipe.bound)  # canvas rows as ImageStore.rows gives them; views cut in the loop
    boxes, flips = recipe.params(0, 0, range(batch), [canvas] * batch)
    batches = [{"pixels": torch.randint(0, 256, (batch, 3, *canvas), dtype=torch.uint8, device=device),
                "positions": torch.arange(batch), "boxes": boxes.to(device), "flips": flips.to(device)}] * steps
    wecolora_epoch(trainer, teacher, batches[: max(1, steps // 5)], recipe=recipe)  # warm-up (kernels, allocator)
    return max(wecolora_epoch(trainer, teacher, batches, recipe=recipe) for _ in range(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--teacher", default="bundled")
    parser.add_argument("--vit-b", action="store_true", help="a random-weights ViT-B/16 at 224 px as the teacher")
    parser.add_argument("--images", type=int, default=12_800)
    parser.add_argument("--size", default="500x375", help="JPEG width x height (default 500x375)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=("fp32", "bf16"))
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--work-dir", help="keep the JPEGs and the run here (default: a temporary folder)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    width, height = (int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory(prefix="wecolora-jpeg-") as tmp:
        work = Path(args.work_dir or tmp)
        folder = work / "jpegs"
        if not folder.is_dir():
            write_jpeg_folder(folder, args.images, (width, height))
        teacher = random_vit_b(work / "vit-b") if args.vit_b else args.teacher
        config = DistillConfig(teacher=teacher, data=str(folder), output=str(work / "run"), ratio=1.0,
                               epochs=args.epochs, batch_size=args.batch_size, device=args.device, precision=precision,
                               teacher_cache="off", num_workers=args.num_workers, overwrite=True)
        start = time.perf_counter()
        distill(config)
        wall = time.perf_counter() - start
        with open(work / "run" / "summary.csv") as f:
            rows = list(csv.DictReader(f))
        rates = [float(r["images_per_s"]) for r in rows]
        top = ceiling(teacher, device=device, precision=precision, batch=args.batch_size,
                      steps=min(50, math.ceil(args.images / args.batch_size)))
        result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "teacher": "random ViT-B/16" if args.vit_b else teacher, "images": args.images, "size": args.size,
                  "epochs": args.epochs, "batch_size": args.batch_size, "precision": precision,
                  "wall_seconds": wall, "images_per_s_per_epoch": rates, "ceiling_images_per_s": top,
                  "best_epoch_fraction_of_ceiling": max(rates) / top,
                  "end_to_end_fraction_of_ceiling": args.images * args.epochs / wall / top}
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
