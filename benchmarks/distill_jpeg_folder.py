"""``wecolora distill`` end to end on a class folder of JPEGs, against bench's compute ceiling on the same device.

Writes N JPEGs (default 12,800 at 500 x 375, the size of a typical ImageNet photo: Fashion-MNIST images
upscaled, with noise, in 10 class folders), runs one distillation over all of them (every epoch a new
view, as a lone run) and reports its images/s per epoch (summary.csv) and its wall time (image store build,
compile and export included); then the ceiling: the same teacher forward and student step on batches already
on the device (``make_trainer`` + ``wecolora_epoch``: the loop distill runs, without its data path; the
views are still cut there, from canvas rows of the JPEGs' stored size), and the ratio distill / ceiling.
``--cache warm`` runs the distillation twice with the teacher cache on (the first run stores every view's
tokens, the second reads them) and reports the second against the warm ceiling (the student step alone).
Run it on an idle machine.

Examples:
    python benchmarks/distill_jpeg_folder.py --images 1024 --epochs 2                      # CPU, bundled teacher
    python benchmarks/distill_jpeg_folder.py --vit-b --device cuda --precision bf16 --batch-size 256 \\
        --images 12800 --epochs 10                                                          # the 1%-ImageNet recipe
    python benchmarks/distill_jpeg_folder.py --vit-b --device cuda --precision bf16 --batch-size 256 \\
        --images 12800 --epochs 10 --cache warm                                             # teacher cache warm
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
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
from wecolora.teachers.vit import last_block_tokens, model_args
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


def ceiling(teacher_spec: str, *, device: torch.device, precision: str, batch: int, steps: int,
            image_size: tuple[int, int], warm: bool = False, compiled: bool | None = None) -> float:
    """images/s of distill's loop (teacher forward + student step, r=2, all six adapters; ``warm``: the student
    step alone, the teacher's tokens ready) on device-resident batches of canvas rows of ``image_size``."""
    from wecolora.cache.images import stored_size
    from wecolora.train.setup import compile_by_default

    teacher = load_model(teacher_spec).requires_grad_(False).to(device)
    rank = plan_student(teacher, 2, mode="wecolora").rank
    trainer = make_trainer(teacher, mode="wecolora", reduction=2, rank=rank, precision=precision, device=device,
                           updates_per_epoch=steps)
    if compiled if compiled is not None else compile_by_default(device):  # as distill compiles its step
        trainer.training.matcher = torch.compile(trainer.training.matcher, dynamic=False)
    recipe = ViewRecipe.for_model(teacher)
    canvas = stored_size(image_size[0], image_size[1], recipe.bound)  # canvas rows as ImageStore.rows gives them
    boxes, flips = recipe.params(0, 0, range(batch), [canvas] * batch)
    one = {"pixels": torch.randint(0, 256, (batch, 3, *canvas), dtype=torch.uint8, device=device),
           "positions": torch.arange(batch), "boxes": boxes.to(device), "flips": flips.to(device)}
    if warm:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            images = recipe.apply(one["pixels"], one["boxes"], one["flips"])
            one["tokens"] = [t.float() for t in last_block_tokens(teacher, images, trainer.training.teacher_blocks)]
    batches = [one] * steps
    wecolora_epoch(trainer, teacher, batches[: max(1, steps // 5)], recipe=recipe)  # warm-up (kernels, allocator)
    return max(wecolora_epoch(trainer, teacher, batches, recipe=recipe) for _ in range(2))


def run_distill(config: DistillConfig, output: Path) -> dict:
    """One distillation; its wall seconds (store, compile and export included) and images/s per epoch."""
    start = time.perf_counter()
    distill(config)
    wall = time.perf_counter() - start
    with open(output / "summary.csv") as f:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(f)]
    return {"wall_seconds": wall, "images_per_s_per_epoch": rates}


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
    parser.add_argument("--cache", choices=("off", "warm"), default="off",
                        help="off: a lone run, teacher every step (default); warm: a second run reads the teacher "
                             "cache the first filled")
    parser.add_argument("--cache-views", type=int, metavar="K",
                        help="views per image (default: --epochs); with --cache warm, 1 keeps the cache to one view "
                             "(3.9 GB for 12,800 images with ViT-B/16 instead of 39 GB) at the same cost per epoch")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the step (default: distill's, on with CUDA and Triton)")
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
        settings = dict(teacher=teacher, data=str(folder), output=str(work / "run"), ratio=1.0, epochs=args.epochs,
                        batch_size=args.batch_size, device=args.device, precision=precision,
                        num_workers=args.num_workers, compile=args.compile, cache_views=args.cache_views,
                        overwrite=True)
        runs = {}
        if args.cache == "off":
            runs["cold"] = run_distill(DistillConfig(**settings, teacher_cache="off"), work / "run")
        else:
            cache = str(work / "teacher-cache")
            shutil.rmtree(cache, ignore_errors=True)
            runs["cold_filling_cache"] = run_distill(DistillConfig(**settings, teacher_cache="on",
                                                                   teacher_cache_dir=cache), work / "run")
            runs["warm"] = run_distill(DistillConfig(**settings, teacher_cache="on", teacher_cache_dir=cache),
                                       work / "run")
        steps = min(50, math.ceil(args.images / args.batch_size))
        tops = {kind: ceiling(teacher, device=device, precision=precision, batch=args.batch_size, steps=steps,
                              image_size=(height, width), warm=kind == "warm", compiled=args.compile)
                for kind in ({"cold", "warm"} if args.cache == "warm" else {"cold"})}
        result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "teacher": "random ViT-B/16" if args.vit_b else teacher, "images": args.images, "size": args.size,
                  "epochs": args.epochs, "batch_size": args.batch_size, "precision": precision,
                  "compile": args.compile, "cache": args.cache, "cache_views": args.cache_views,
                  "torch": torch.__version__,
                  "ceiling_images_per_s": tops}
        for name, run in runs.items():
            top = tops["warm" if name == "warm" else "cold"]
            run["best_epoch_fraction_of_ceiling"] = max(run["images_per_s_per_epoch"]) / top
            run["end_to_end_images_per_s"] = args.images * args.epochs / run["wall_seconds"]
            run["end_to_end_fraction_of_ceiling"] = run["end_to_end_images_per_s"] / top
        result["runs"] = runs
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
