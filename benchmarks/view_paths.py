"""Ways to make the paper's views from a folder of JPEGs: disk per image, views/s and fidelity to PIL's pipeline.

The paper's views are torchvision's RandomResizedCrop (224 px, scale 0.2-1, bicubic) + flip of the ORIGINAL
image, with PIL doing the resampling (antialiased when shrinking). Each path below makes the views of the same
boxes (drawn on the originals) and flips, and is scored against that PIL pipeline (PSNR, dB, at crop scales 0.2,
0.5 and 1.0, over the images of the folder) and timed (views/s over whole batches, the store already built):

- ``store-258-grid``: wecolora 0.3: a store bounded to a 258 px short side, one bicubic ``grid_sample`` per batch;
- ``store-501`` / ``store-579``: a store bounded to 501 (224 / sqrt(0.2)) or 579 px (224 / sqrt(0.2 x 3/4), the
  smallest box side the recipe draws: wecolora's bound) and ``resized_crops`` (PIL's weights, batched products on
  a device, box by box on the CPU);
- ``jpeg-bytes``: the encoded files kept as they are and decoded per batch (``torchvision.io.decode_jpeg``, on
  the device when it is CUDA: a list of JPEGs decoded in one call), then ``resized_crops``;
- ``pil``: torchvision's per-image PIL pipeline itself (the reference; its own time, fidelity by definition).

For images larger than the bound, the store's build decodes them whole and shrinks them; PIL's JPEG draft mode
(DCT scaling by 1/2, 1/4 or 1/8 while decoding) is timed and scored on the build as ``--large`` JPEGs.

Examples:
    python benchmarks/view_paths.py --images 256 --threads 1         # CPU: 500 x 375 JPEGs made from real photos
    python benchmarks/view_paths.py --images 2048 --device cuda      # on a GPU (benchmarks/gpu_checks.sh)
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from wecolora.cache.images import open_store, shrink, stored_size
from wecolora.data import augment
from wecolora.data.datasets import open_dataset
from wecolora.data.views import stored_boxes, view_params
from wecolora.runtime import resolve_device

SIZE = 224
SCALES = (0.2, 0.5, 1.0)


def photos() -> list[np.ndarray]:
    """Real photos shipped with scikit-image (RGB uint8); where it is not installed (a bare GPU machine), textured
    synthetic pictures at 1000 x 872 (the timings hold; the PSNRs are then not those of photos)."""
    try:
        import skimage.data as data
    except ImportError:
        rng = np.random.default_rng(0)
        pictures = []
        for k in range(6):
            coarse = Image.fromarray(rng.integers(0, 256, (872 // (4 + k), 1000 // (4 + k), 3), dtype=np.uint8))
            pixels = np.array(coarse.resize((1000, 872), Image.BICUBIC))
            pixels[::7, :] = 255 - pixels[::7, :]  # fine lines: detail a blurred view loses
            pictures.append(pixels)
        return pictures
    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "motorcycle_left")
    found = []
    for name in names:
        try:
            image = getattr(data, name)()
        except Exception:  # a file this scikit-image release fetches from the network
            continue
        if image.ndim == 3 and image.shape[2] >= 3:
            found.append(np.ascontiguousarray(image[..., :3]))
    return found


def write_folder(folder: Path, images: int, size: tuple[int, int], seed: int = 0) -> None:
    """``images`` JPEGs (quality 90) of ``size`` (width, height), each a random window of that size cut from a real
    photo at its own resolution (no resampling: a camera's full detail, as in ImageNet's photos), or of its
    transpose (a portrait)."""
    width, height = size
    sources = [p for p in photos() if min(p.shape[:2]) >= min(size) and max(p.shape[:2]) >= max(size)]

    def write(i: int) -> None:
        rng = np.random.default_rng([seed, i])
        photo = sources[i % len(sources)]
        h, w = photo.shape[:2]
        ch, cw = (height, width) if h >= height and w >= width else (width, height)
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        path = folder / "train" / f"class{i % 10}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[top:top + ch, left:left + cw]).save(path, quality=90)

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(write, range(images)))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return 10 * math.log10(255 ** 2 / max(mse, 1e-12))


def boxes_at(sizes: np.ndarray, scale: float, seed: int) -> torch.Tensor:
    """One box per image covering ``scale`` of it, aspect in 3/4-4/3, at a random place (original pixels)."""
    rng = np.random.default_rng(seed)
    boxes = []
    for h, w in sizes:
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        bw, bh = min(w, round(math.sqrt(scale * h * w * aspect))), min(h, round(math.sqrt(scale * h * w / aspect)))
        boxes.append((int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1)), bh, bw))
    return torch.tensor(boxes, dtype=torch.float32)


def grid_views(rows: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """wecolora 0.3's views: one bicubic ``grid_sample`` of the canvas rows (no antialiasing; taps past the box)."""
    b, _, height, width = rows.shape
    top, left, h, w = boxes.to(rows.device).unbind(1)
    theta = torch.zeros(b, 2, 3, device=rows.device)
    theta[:, 0, 0] = torch.where(flips.to(rows.device), -w / width, w / width)
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [b, 3, SIZE, SIZE], align_corners=False)
    return F.grid_sample(rows.float(), grid, mode="bicubic", padding_mode="border", align_corners=False)


def pil_views(paths: list[str], boxes: torch.Tensor, flips: torch.Tensor) -> list[torch.Tensor]:
    """The reference: torchvision's PIL pipeline on the original files."""
    views = []
    for path, box, flip in zip(paths, boxes.tolist(), flips.tolist()):
        with Image.open(path) as image:
            view = TF.resized_crop(image.convert("RGB"), *(int(v) for v in box), [SIZE, SIZE],
                                   InterpolationMode.BICUBIC, antialias=True)
        view = TF.hflip(view) if flip else view
        views.append(torch.from_numpy(np.array(view)).permute(2, 0, 1))
    return views


def best_rate(make, count: int, rounds: int, device: torch.device) -> float:
    """Views/s of ``make()`` (which makes ``count`` views), best of ``rounds`` after one warm-up."""
    make()
    seconds = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        make()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return count / min(seconds)


def measure(folder: Path, cache: Path, *, device: torch.device, batch: int, rounds: int) -> dict:
    dataset = open_dataset(str(folder), "train")
    n = len(dataset)
    paths = [path for path, _ in dataset.samples]
    encoded = [Path(p).read_bytes() for p in paths]
    result = {"images": n, "device": str(device), "batch": batch, "paths": {}}
    stores = {bound: open_store(dataset, range(n), bound=bound, cache_dir=cache, num_workers=min(8, os.cpu_count()))
              for bound in (258, 501, 579)}
    originals = stores[579].originals
    result["original_size"] = [int(v) for v in np.median(originals, axis=0)]
    positions = np.arange(min(batch, n))
    boxes, flips = view_params(0, 0, positions, originals[positions])  # the recipe's own boxes, for the timing

    def from_store(bound: int, grid: bool):
        store = stores[bound]

        def make(boxes=boxes, flips=flips, positions=positions):
            rows = torch.from_numpy(store.rows(positions)).to(device, non_blocking=True)
            stored = stored_boxes(boxes, store.originals[positions], store.sizes[positions])
            if grid:
                return grid_views(rows, stored, flips).clamp(0, 255)
            return augment.resized_crops(rows, stored, SIZE, flip=flips.to(device)).clamp(0, 255)
        return make

    def from_bytes(boxes=boxes, flips=flips, positions=positions):
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.frombuffer(bytearray(encoded[p]), dtype=torch.uint8) for p in positions]
        if device.type == "cuda":
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        else:
            images = [decode_jpeg(d, mode=ImageReadMode.RGB) for d in data]
        height = max(i.shape[1] for i in images)
        width = max(i.shape[2] for i in images)
        rows = torch.stack([F.pad(i, (0, width - i.shape[2], 0, height - i.shape[1])) for i in images]).to(device)
        return augment.resized_crops(rows, boxes.to(device), SIZE, flip=flips.to(device)).clamp(0, 255)

    def per_image_pil(boxes=boxes, flips=flips, positions=positions):
        return pil_views([paths[p] for p in positions], boxes, flips)

    makers = {"store-258-grid": from_store(258, True), "store-501": from_store(501, False),
              "store-579": from_store(579, False), "jpeg-bytes": from_bytes, "pil": per_image_pil}
    disk = {f"store-{b}": stores[b].meta["bytes"] / n for b in (258, 501, 579)}
    disk["store-258-grid"] = disk.pop("store-258")
    disk["jpeg-bytes"] = disk["pil"] = sum(len(e) for e in encoded) / n
    for name, make in makers.items():
        row = {"disk_bytes_per_image": round(disk[name]),
               "views_per_s": best_rate(make, len(positions), rounds, device)}
        if name != "pil":
            for scale in SCALES:
                scores = []
                for start in range(0, n, batch):  # every image of the folder, at this scale
                    part = np.arange(start, min(n, start + batch))
                    box = boxes_at(originals[part], scale, seed=start + int(scale * 10))
                    flip = torch.arange(len(part)) % 2 == 1
                    views = make(box, flip, part).round().cpu()
                    scores += [psnr(v, r) for v, r in zip(views, pil_views([paths[p] for p in part], box, flip))]
                row[f"psnr_scale_{scale}"] = {"mean": float(np.mean(scores)), "min": float(np.min(scores))}
        result["paths"][name] = row
    return result


def draft_build(folder: Path, size: tuple[int, int], bound: int, count: int) -> dict:
    """The store's build of JPEGs larger than the bound: full decode + antialiased shrink, against PIL's draft
    mode (decoded at 1/2, 1/4 or 1/8 scale, no smaller than the stored size) + the same shrink. Scored against
    the full decode's copy (PSNR) and timed (images/s, one thread)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    sources = photos()
    files = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(sources[i % len(sources)]).resize(size, Image.BICUBIC).save(buffer, "JPEG", quality=90)
        files.append(buffer.getvalue())
    height, width = stored_size(size[1], size[0], bound)

    def full(data: bytes) -> torch.Tensor:
        image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return shrink(image, height, width)

    def draft(data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (width, height))  # the smallest DCT scale still at least the stored size
            pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        return pixels if pixels.shape[1:] == (height, width) else shrink(pixels, height, width)

    timings, copies = {}, {}
    for name, fn in (("full-decode", full), ("draft", draft)):
        fn(files[0])
        start = time.perf_counter()
        copies[name] = [fn(f) for f in files]
        timings[name] = count / (time.perf_counter() - start)
    scores = [psnr(a.float(), b.float()) for a, b in zip(copies["draft"], copies["full-decode"])]
    return {"jpeg_size": list(size), "stored_size": [width, height], "images_per_s": timings,
            "draft_psnr_vs_full": {"mean": float(np.mean(scores)), "min": float(np.min(scores))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", default="500x375", help="JPEG width x height (default 500x375)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--large", default="1600x1200", help="JPEG size for the build's draft-mode measurement")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work-dir", help="keep the JPEGs and stores here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 on a shared machine, "
                                                    "where a thread team waiting on a busy core stalls every op)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="wecolora-views-") as tmp:
        work = Path(args.work_dir or tmp)
        folder = work / "jpegs"
        if not folder.is_dir():
            write_folder(folder, args.images, (width, height))
        result = measure(folder, work / "stores", device=device, batch=args.batch, rounds=args.rounds)
        large = tuple(int(v) for v in args.large.split("x"))
        result["large_jpeg_build"] = draft_build(folder, large, 579, count=min(32, args.images))
        result["torch_threads"] = torch.get_num_threads()
        result["photos"] = "scikit-image" if importlib.util.find_spec("skimage") else "synthetic"
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
