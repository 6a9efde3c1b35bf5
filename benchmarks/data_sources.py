"""Listing, subset choice and image-store building on a large synthetic source: a folder and WebDataset tar shards.

Not a test: it prints measured seconds, peak memory and bytes read of each phase, for two subset sizes, so that
one can see what grows with the source (listing) and what grows with the chosen images only (the choice, which
checks the chosen images decode, and the store, which decodes them):

    PYTHONPATH=src python benchmarks/data_sources.py                       # 200,000 images, subsets of 200 and 2,000
    PYTHONPATH=src python benchmarks/data_sources.py --images 20000 --subsets 100 1000   # a quick look

The source is written once under --workdir (8x8 RGB PNGs, about 250 bytes each: a flat folder, and the same images
in tar shards of 10,000) and reused by later calls. Each (source, subset size) is measured in a process of its
own, twice: once timed (``seconds``), once under tracemalloc (which slows allocation-heavy code several times) for
``peak_mb``, the phase's largest Python allocation (numpy arrays included); ``rss_mb`` is the timed process's
resident-set high-water mark after the phase (about 1 GB of it is torch and timm, imported before the first
phase), ``read_mb`` the bytes the phase read from files (``/proc/self/io`` rchar; a directory walk reads none). The tar index is built by the first listing of the shards and
remembered per shard (path, size, mtime): ``listing (again)`` is a second listing in the same process.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def write_source(workdir: Path, n: int, shard_size: int) -> None:
    """``folder/IIIIIII.png`` and ``shards/shards-SSS.tar`` (key IIIIIII.png) of the same n images, written once."""
    done = workdir / f"done-{n}"
    if done.is_file():
        return
    from PIL import Image

    (workdir / "folder").mkdir(parents=True, exist_ok=True)
    (workdir / "shards").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    archive = None
    for i in range(n):
        if i % shard_size == 0:
            if archive is not None:
                archive.close()
            archive = tarfile.open(workdir / "shards" / f"shards-{i // shard_size:03d}.tar", "w")
        pixels = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        data = buffer.getvalue()
        (workdir / "folder" / f"{i:07d}.png").write_bytes(data)
        info = tarfile.TarInfo(f"{i:07d}.png")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    archive.close()
    done.write_text(str(n))
    print(f"wrote {n} images (folder and {len(list((workdir / 'shards').glob('*.tar')))} shards) in "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr)


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def measure(phase: str, call, rows: list, memory: bool) -> object:
    """Run ``call`` once, recording seconds, the RSS high-water mark and the bytes read, or (``memory``) the
    tracemalloc peak."""
    if memory:
        tracemalloc.start()
    before, start = read_bytes(), time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    row = {"phase": phase}
    if memory:
        row["peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 1e6, 1)
        tracemalloc.stop()
    else:
        row.update(seconds=round(seconds, 3), rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1),
                   read_mb=round((read_bytes() - before) / 1e6, 1))
    rows.append(row)
    return result


def one(workdir: Path, kind: str, count: int, memory: bool) -> list[dict]:
    """The phases on one source kind for one subset size, in this process."""
    cache = workdir / f"cache-{kind}-{count}"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["WECOLORA_CACHE_DIR"] = str(cache)  # cold: tar index, decode checks, store
    from wecolora.cache.images import open_store
    from wecolora.data.datasets import open_dataset
    from wecolora.data.subset import SubsetChoice

    last = len(list((workdir / "shards").glob("*.tar"))) - 1
    spec = str(workdir / "folder") if kind == "folder" else f"{workdir / 'shards'}/shards-{{000..{last:03d}}}.tar"
    rows: list[dict] = []
    dataset = measure("listing", lambda: open_dataset(spec), rows, memory)
    measure("listing (again)", lambda: open_dataset(spec), rows, memory)
    choice = measure("subset choice (random, decode check)",
                     lambda: SubsetChoice(dataset, rule="random", images=count, seed=0).prepare(), rows, memory)
    indices, _ = choice.choose()
    measure("image store build", lambda: open_store(dataset, indices, bound=33, num_workers=0), rows, memory)
    for row in rows:
        row.update(source=kind, images=len(dataset), chosen=count)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--subsets", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "wecolora-bench-sources"))
    parser.add_argument("--one", nargs=3, metavar=("KIND", "COUNT", "MEMORY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir) / str(args.images)
    if args.one:
        print(json.dumps(one(workdir, args.one[0], int(args.one[1]), args.one[2] == "memory")))
        return
    write_source(workdir, args.images, args.shard_size)
    rows = []
    for kind in ("folder", "shards"):
        for count in args.subsets:
            runs = {}
            for mode in ("time", "memory"):
                proc = subprocess.run([sys.executable, __file__, "--images", str(args.images), "--workdir",
                                       args.workdir, "--one", kind, str(count), mode], capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{kind} {count} {mode}: failed\n{proc.stderr[-3000:]}")
                runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            rows += [{**timed, **traced} for timed, traced in zip(runs["time"], runs["memory"])]
    print(f"{'source':8} {'images':>8} {'chosen':>7}  {'phase':38} {'seconds':>8} {'peak MB':>8} {'RSS MB':>7} "
          f"{'read MB':>8}")
    for r in rows:
        print(f"{r['source']:8} {r['images']:>8} {r['chosen']:>7}  {r['phase']:38} {r['seconds']:>8.2f} "
              f"{r['peak_mb']:>8.1f} {r['rss_mb']:>7.0f} {r['read_mb']:>8.1f}")


if __name__ == "__main__":
    main()
