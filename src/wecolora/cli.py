"""``wecolora`` command line: parses arguments and calls the API, nothing else.

Imports of torch and friends happen inside the handlers so that ``wecolora --help`` is instant.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys

from wecolora import __version__, api
from wecolora.config import (
    CACHE_POLICIES,
    CORESET_METHODS,
    DEFAULT_REDUCTION,
    DEVICES,
    FOLDER_LAYOUTS,
    INITS,
    LOSS_NAMES,
    MATCH_NAMES,
    MODE_NAMES,
    MONITORS,
    POOLINGS,
    POS_EMBEDS,
    PRECISIONS,
    PROBE_OPTIMIZERS,
    PROBE_PROTOCOLS,
    PROBE_TASKS,
    SUBSET_RULES,
    RUNTIMES,
    WIDTH_LOSSES,
    WIDTH_RANKINGS,
    DistillConfig,
    KnnConfig,
    PlanConfig,
    PretrainConfig,
    ProbeConfig,
    build_config,
    parse_keep,
)
from wecolora.errors import UserError
from wecolora.files import disk_error

DISTILL_EXAMPLES = """examples:
  # the paper's recipe (r=2, rank 128, 1% of the classes' images, 10 epochs) on a class-folder set
  wecolora distill --teacher vit_base_patch16_224.mae --data /data/imagenet --output runs/mae-r2

  # the bundled teacher (offline), 3x fewer blocks, 5% of Fashion-MNIST, small batches on the CPU
  wecolora distill --teacher bundled --data fashion-mnist --output runs/fm-r3 \\
      --reduction 3 --ratio 0.05 --batch-size 64 --accum-steps 1 --epochs 5

  # your own unlabeled images (a folder at any depth, a .txt/.csv list, a datasets folder or parquet files,
  # WebDataset shards): 1% drawn uniformly, or chosen from the teacher's features (coreset)
  wecolora distill --teacher bundled --data /data/photos --output runs/photos --subset random
  wecolora distill --teacher bundled --data 'wds:/data/shards-{000..127}.tar' --output runs/wds --subset coreset --images 5000
  wecolora distill --teacher bundled --data /data/hf-saved --image-column img --output runs/hf --ratio 0.02

  # a baseline, and continuing an interrupted run
  wecolora distill --teacher bundled --data fashion-mnist --output runs/kd --mode weco-kd --batch-size 64 --accum-steps 1
  wecolora distill --teacher bundled --data fashion-mnist --output runs/kd --mode weco-kd --batch-size 64 --accum-steps 1 --resume auto

  # several students of one teacher and subset: cache the teacher's tokens once, the later runs read them
  wecolora distill --teacher bundled --data fashion-mnist --output runs/r2 --cache-teacher on
  wecolora distill --teacher bundled --data fashion-mnist --output runs/r3 --cache-teacher on --reduction 3
  wecolora cache list                     # what the caches hold; wecolora cache clear --older-than 30

  # a narrower student too: 2 of the 4 heads (64 channels) and 256 MLP neurons, chosen from the subset's activations
  wecolora distill --teacher bundled --data fashion-mnist --output runs/narrow --embed-dim 64 --mlp-hidden 256
  # a shape chosen by a budget measured on this machine: at least 3x the teacher's speed (see `wecolora plan`)
  wecolora distill --teacher bundled --data fashion-mnist --output runs/fast --speedup 3

  # 8 GPUs on one node (effective batch 128 x 1 x 8 = 1024, lr 4e-3 by the rule)
  torchrun --nproc-per-node 8 -m wecolora distill --teacher vit_base_patch16_224.mae --data /data/imagenet \\
      --output runs/mae-r2 --accum-steps 1
"""

INSPECT_EXAMPLES = """examples:
  wecolora inspect --teacher vit_base_patch16_224 --reduction 2 --rank 128
  wecolora inspect --teacher bundled --reduction 3 --mode lora-qv --json
  wecolora inspect --teacher vit_base_patch16_224 --embed-dim 384      # ViT-S width: 6 of the 12 heads
"""

WIDTH_HELP = {
    "embed_dim": "student residual width: a multiple of the teacher's head size (whole heads are kept, so it fixes "
                 "the head count); default the teacher's",
    "heads": "attention heads kept (the width is heads x the teacher's head size); default the teacher's",
    "mlp_hidden": "MLP hidden neurons kept per block; default the teacher's",
    "width_ratio": "instead of the three: keep round(w x heads) heads and round(w x neurons) neurons",
}


def add_width_arguments(g) -> None:
    """--embed-dim, --heads, --mlp-hidden, --width-ratio (distill and inspect)."""
    for name, what in WIDTH_HELP.items():
        g.add_argument(f"--{name.replace('_', '-')}", type=float if name == "width_ratio" else int,
                       metavar="W" if name == "width_ratio" else "N", help=what)


def add_budget_arguments(g) -> None:
    """--speedup, --latency-ms, --params (plan and distill)."""
    g.add_argument("--speedup", type=float, metavar="S", help="at least S times the teacher's measured speed")
    g.add_argument("--latency-ms", type=float, metavar="X", help="at most X ms per batch")
    g.add_argument("--params", type=float, metavar="P", help="at most P parameters (e.g. 2e6)")


DATA_HELP = ("a folder (class folders D/train/<class>/..., or images at any depth: unlabeled), a .txt/.csv file "
             "list, a datasets save_to_disk folder or .parquet/.arrow files, WebDataset .tar shards "
             "('shards-{000..127}.tar'), or fashion-mnist, mnist-5k; a prefix hf-datasets:, wds:, list:, folder: "
             "forces the kind")


def add_source_arguments(group) -> None:
    """How ``--data`` is read: the options of :class:`wecolora.config.SourceSettings`."""
    group.add_argument("--folder-layout", choices=FOLDER_LAYOUTS,
                       help="a folder: auto (default: images directly inside = unlabeled, sub-folders = classes, "
                            "said in the log), classes, or unlabeled (every image at any depth, no labels)")
    group.add_argument("--image-column", metavar="NAME",
                       help="the csv column of image paths, or the datasets/parquet column of images (default: "
                            "found by name or type)")
    group.add_argument("--label-column", metavar="NAME[,NAME...]",
                       help="the csv/datasets label column ('A|B' values: multi-label), or several 0/1 columns "
                            "'A,B,C' (multi-label); default: a ClassLabel column or one named label/class")


class Parser(argparse.ArgumentParser):
    """argparse with the project's one-line error format and exit status 2."""

    def error(self, message):
        self.exit(2, f"wecolora: error: {message} (see `{self.prog} --help`)\n")


def add_distill_parser(sub) -> None:
    p = sub.add_parser("distill", help="distill a ViT teacher into a weight-copied student",
                       description="Distill a timm ViT teacher into a shallower weight-copied student with "
                                   "enhanced LoRA (WeCoLoRA) or a baseline, on a few-shot unlabeled subset.",
                       epilog=DISTILL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", dest="config_file", metavar="FILE.yaml",
                   help="settings file (defaults < file < flags); a run's config.yaml 'settings' block works")
    g = p.add_argument_group("inputs and outputs")
    g.add_argument("--teacher", help="timm name[.tag], local-dir:FOLDER, hf-hub:ORG/NAME, a run folder, bundled "
                                     "(supervised Fashion-MNIST ViT) or bundled-mae (its self-supervised MAE twin)")
    g.add_argument("--teacher-weights", metavar="FILE", help="local .safetensors/.pth loaded into --teacher's architecture")
    g.add_argument("--img-size", type=int, help="input size (default: the teacher's)")
    g.add_argument("--data", help=DATA_HELP)
    add_source_arguments(g)
    g.add_argument("--output", metavar="DIR", help="run folder: student/, adapter/, config.yaml, summary.csv, "
                                                   "subset.txt, subset.json")
    g.add_argument("--overwrite", action="store_true", default=None, help="replace a finished run in --output")
    g.add_argument("--resume", metavar="auto|PATH", help="continue an interrupted run (auto: DIR/checkpoint)")
    g = p.add_argument_group("student")
    g.add_argument("--mode", choices=MODE_NAMES, help="wecolora (default), lora-qv, weco-kd or scratch-kd")
    g.add_argument("--reduction", type=int, help="keep every r-th teacher block (default 2)")
    g.add_argument("--keep", help="first (default), last, teacher block indices like 0,4,8, or chosen from the "
                   "subset: auto (best of first, last, greedy, influence by the initial L1), greedy, influence")
    g.add_argument("--keep-images", type=int, metavar="N",
                   help="subset images a searched --keep (2/3 search, 1/3 scoring) and the activation width ranking "
                        "look at (default 384)")
    g.add_argument("--rank", type=int, help="adapter rank (default 128, width/4 for narrow students)")
    g.add_argument("--lora-alpha", type=float, help="peft lora_alpha (default: rank, i.e. scale 1)")
    g.add_argument("--lora-dropout", type=float, help="adapter dropout (default 0)")
    g.add_argument("--dora", action="store_true", default=None, help="weight-decomposed adapters (DoRA)")
    g.add_argument("--rslora", action="store_true", default=None, help="rank-stabilised scaling alpha/sqrt(r)")
    g = p.add_argument_group("student width (see docs/shapes.md)")
    add_width_arguments(g)
    g.add_argument("--width-ranking", choices=WIDTH_RANKINGS,
                   help="which channels, heads and neurons: activation (default; Minitron's rules on --keep-images "
                        "subset images) or uniform (Weight Selection's evenly spaced indices, no data)")
    g.add_argument("--width-loss", choices=WIDTH_LOSSES,
                   help="narrower residual: kept (default) = the teacher's tokens on the kept channels; projection = "
                        "a learned linear map to the teacher's width, trained with the student, dropped at export")
    g = p.add_argument_group("shape budget: the planner chooses --reduction and the widths (see `wecolora plan`)")
    add_budget_arguments(g)
    g.add_argument("--budget-device", choices=DEVICES, help="where the latency is measured (default auto: the run's device)")
    g.add_argument("--budget-runtime", choices=RUNTIMES, help="torch (default) or onnxruntime")
    g.add_argument("--budget-batch-size", type=int, metavar="B", help="images per timed call (default 32)")
    g = p.add_argument_group("objective and data")
    g.add_argument("--loss", choices=LOSS_NAMES, help="distance between token sets (default l1)")
    g.add_argument("--match", choices=MATCH_NAMES,
                   help="last: last block before the final norm (default); last-norm: after it; per-block")
    g = p.add_argument_group("few-shot subset")
    g.add_argument("--subset", choices=SUBSET_RULES,
                   help="per-class (the paper's: a share of each class; default with labels), random (uniform, "
                        "seeded; default without labels) or coreset (the teacher's CLS features of a uniform "
                        "candidate pool, then k-center greedy picks)")
    g.add_argument("--ratio", type=float, help="fraction used (default 0.01): of each class (per-class) or of the "
                                               "whole source (random, coreset)")
    g.add_argument("--images", type=int, metavar="N", help="N images in all instead of --ratio (per-class: shared "
                                                           "in proportion to the classes)")
    g.add_argument("--per-class", type=int, help="per-class: a fixed number of images per class instead of --ratio")
    g.add_argument("--coreset-pool", type=int, metavar="N",
                   help="coreset: candidates drawn uniformly whose teacher features are compared (default 10000; "
                        "raised to the subset size)")
    g.add_argument("--coreset-method", choices=CORESET_METHODS,
                   help="coreset: kcenter (farthest point, default) or kmeans++ (D^2 sampling)")
    g.add_argument("--min-per-class", type=int, help="per-class: fail if a class gets fewer images (default 1)")
    g.add_argument("--max-unreadable", type=float,
                   help="share of the chosen images that may be unreadable or missing, skipped and counted "
                        "(default 0.05)")
    g.add_argument("--subset-seed", type=int, help="seed of the draw (default 0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="default 10")
    g.add_argument("--batch-size", type=int, help="per device (default 128)")
    g.add_argument("--accum-steps", type=int, help="gradient accumulation steps (default 8)")
    g.add_argument("--blr", type=float, help="base lr; lr = blr x effective batch / 256 (default 1e-3)")
    g.add_argument("--lr", type=float, help="absolute peak lr (overrides --blr)")
    g.add_argument("--warmup-epochs", type=int, help="linear warmup from 0 (default 2, shortened to fit shorter runs)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay, not on 1-D params (default 0.05)")
    g.add_argument("--seed", type=int, help="training seed (default 0)")
    g.add_argument("--precision", choices=PRECISIONS, help="default bf16 on CUDA, fp32 on CPU")
    g.add_argument("--device", choices=DEVICES, help="auto (default): cuda when available")
    g.add_argument("--num-workers", type=int, help="data loader workers (default: min(8, CPU threads))")
    g = p.add_argument_group("speed")
    g.add_argument("--cache-teacher", dest="teacher_cache", choices=CACHE_POLICIES,
                   help="store the teacher's tokens per (image, view) on disk for later students and reruns of the "
                        "same teacher and subset: auto (default) = on inside `wecolora ablate` and with "
                        "--teacher-cache DIR, off for a lone run (its tokens would never be read back)")
    g.add_argument("--teacher-cache", dest="teacher_cache_dir", metavar="DIR",
                   help="the cache's folder; giving it turns the cache on (default $WECOLORA_CACHE_DIR/teacher, "
                        "else ~/.cache/wecolora/teacher)")
    g.add_argument("--no-teacher-cache", dest="teacher_cache", action="store_const", const="off",
                   help="the same as --cache-teacher off: run the teacher at every step")
    g.add_argument("--cache-max-gb", type=float, metavar="GB",
                   help="cap of the teacher cache and image stores together, in GB; the least recently used entries "
                        "are evicted to stay under it (default $WECOLORA_CACHE_MAX_GB, else 50)")
    g.add_argument("--cache-views", type=int, metavar="K",
                   help="augmented views per image; epoch e shows view e mod K (default: --epochs)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the student's training step (default: on with CUDA and Triton installed, where "
                        "it measured 1.24x faster on an H200, ViT-B/16 bf16; off on the CPU, where compiling costs "
                        "half a minute)")
    p.set_defaults(handler=run_distill)


def run_distill(args) -> int:
    flags = {k: v for k, v in vars(args).items() if k not in ("handler", "config_file", "command")}
    config = build_config(DistillConfig, args.config_file, **flags)
    result = api.distill(config)
    last = result["epochs"][-1] if result["epochs"] else {}
    unreadable = len(result.get("unreadable_images", ()))
    skipped = f", {unreadable} unreadable images skipped" if unreadable else ""
    search = result.get("block_search")
    if search:
        print(f"keep {search['method']}: " + ", ".join(f"{name} {c['kept']} initial L1 {c['l1']:.4f}"
                                                     for name, c in search["candidates"].items())
              + f" -> {search['chosen']}")
    width = f", width {result['embed_dim']}/{result['heads']} heads/MLP {result['mlp_hidden']}" \
        if result.get("width_selection") else ""
    print(f"done: {result['output']}/student (mode {result['mode']}, blocks {result['kept_blocks']}{width}, "
          f"final loss {last.get('loss', float('nan')):.4f}{skipped})")
    return 0


VIEWS_EXAMPLES = """examples:
  # the first 32 views a distillation of the bundled teacher on 1% of Fashion-MNIST shows (epoch 1, in order)
  wecolora views --teacher bundled --data fashion-mnist --count 32 --output /tmp/views

  # what a run of yours showed: its config.yaml gives every setting
  wecolora views --config runs/mae-r2/config.yaml --count 64 --output runs/mae-r2/views
writes DIR/view-000.png ... (8-bit RGB at the teacher's input size, before normalisation) and DIR/views.json:
[{"image": source path, "box": [top, left, height, width] on the original, "flip": true|false}, ...]
in the order training shows them; each view is PIL's bicubic antialiased resize of that box of the original.
"""


def add_views_parser(sub) -> None:
    p = sub.add_parser("views", help="write the first training views a distillation would show, with their boxes",
                       description="Write, as PNG files, the first N augmented views a `wecolora distill` with the "
                                   "same data, subset and seed settings shows its teacher and student (epoch 1 in "
                                   "the subset's order, then epoch 2, ...), and views.json: each view's source "
                                   "image, crop box on the original and flip. Nothing is trained; the teacher's "
                                   "weights are read only to choose a coreset (its input size and mean/std always).",
                       epilog=VIEWS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", dest="config_file", metavar="FILE.yaml",
                   help="a distillation's settings file (a run's config.yaml works); flags override it")
    p.add_argument("--count", type=int, required=True, metavar="N", help="how many views to write")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="writes DIR/view-000.png ... and DIR/views.json (a new or empty folder, or earlier views)")
    p.add_argument("--teacher", help="as distill's --teacher (its input size and mean/std shape the views)")
    p.add_argument("--img-size", type=int, help="input size (default: the teacher's)")
    p.add_argument("--data", help="as distill's --data")
    add_source_arguments(p)
    p.add_argument("--subset", choices=SUBSET_RULES, help="as distill's --subset (default per-class with labels, "
                                                          "random without)")
    for name, kind, what in (("ratio", float, "fraction of each class's images used (default 0.01)"),
                             ("images", int, "images in all instead of --ratio"),
                             ("per-class", int, "a fixed number of images per class instead of --ratio"),
                             ("min-per-class", int, "fail if a class gets fewer images (default 1)"),
                             ("max-unreadable", float, "share of the chosen images that may be unreadable (default 0.05)"),
                             ("subset-seed", int, "seed of the per-class shuffle (default 0)"),
                             ("seed", int, "training seed: the views and their order (default 0)"),
                             ("epochs", int, "the run's epochs (default 10): with --cache-views, which view each shows"),
                             ("cache-views", int, "augmented views per image; epoch e shows view e mod K (default: --epochs)"),
                             ("num-workers", int, "workers decoding the image store (default: min(8, CPU threads))")):
        p.add_argument(f"--{name}", type=kind, help=what)
    p.set_defaults(handler=run_views)


def run_views(args) -> int:
    flags = {k: v for k, v in vars(args).items() if k not in ("handler", "config_file", "command", "count")}
    config = build_config(DistillConfig, args.config_file, **flags)
    records = api.views(args.count, args.output, config)
    print(f"wrote {len(records)} views ({config.teacher} on {config.data}, seed {config.seed}) to {args.output}: "
          f"view-{0:03d}.png ... and views.json")
    return 0


def add_inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="kept blocks and parameter counts of a student, without training",
                       epilog=INSPECT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="timm name, local-dir:FOLDER, run folder, bundled or bundled-mae "
                                                    "(weights not loaded)")
    p.add_argument("--img-size", type=int, help="input size (default: the teacher's)")
    p.add_argument("--reduction", type=int, default=DEFAULT_REDUCTION)
    p.add_argument("--keep", default="first", help="first, last or block indices like 0,4,8 (a searched keep "
                   "needs the subset: use distill, then inspect its kept list)")
    p.add_argument("--mode", choices=MODE_NAMES, default="wecolora")
    p.add_argument("--rank", type=int, help="adapter rank (default 128, width/4 for narrow students)")
    add_width_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run_inspect)


def run_inspect(args) -> int:
    keep = parse_keep(args.keep)
    if isinstance(keep, str) and keep not in ("first", "last"):
        raise UserError(f"--keep {keep} chooses blocks from the few-shot images, which inspect does not read: run "
                        f"distill --keep {keep} (its config.yaml records the kept blocks), then inspect --keep LIST")
    widths = {name: getattr(args, name) for name in WIDTH_HELP}
    info = api.inspect(args.teacher, args.reduction, args.keep, args.mode, args.rank, img_size=args.img_size, **widths)
    if args.json:
        print(json.dumps(info))
        return 0
    millions = {k: f"{info[k] / 1e6:.2f}M" for k in ("teacher_params", "student_params", "trainable_params", "merged_params")}
    rank = f", rank {info['rank']}" if info["rank"] else ""
    print(f"teacher          {info['teacher']} ({info['teacher_blocks']} blocks, width {info['width']}, "
          f"{info['teacher_heads']} heads of {info['head_dim']}, MLP {info['teacher_mlp_hidden']})\n"
          f"kept blocks      {info['kept_blocks']} (reduction {args.reduction}, keep {args.keep})\n"
          f"width            {info['embed_dim']} channels, {info['heads']} heads of {info['head_dim']}, "
          f"MLP {info['mlp_hidden']}\n"
          f"FLOPs per image  teacher {info['teacher_flops'] / 1e6:.2f}M, student {info['student_flops'] / 1e6:.2f}M "
          f"({info['teacher_flops'] / info['student_flops']:.2f}x fewer)\n"
          f"mode             {info['mode']}{rank}\n"
          f"teacher params   {millions['teacher_params']:>8} ({info['teacher_params']:,})\n"
          f"student params   {millions['student_params']:>8} ({info['student_params']:,}, with adapters)\n"
          f"trainable        {millions['trainable_params']:>8} ({info['trainable_params']:,})\n"
          f"merged student   {millions['merged_params']:>8} ({info['merged_params']:,}, what is exported)")
    return 0


PLAN_EXAMPLES = """examples:
  wecolora plan --teacher bundled                        # every candidate, its latency on this machine, the front
  wecolora plan --teacher bundled --speedup 3            # mark the shapes at least 3x the teacher's speed
  wecolora plan --teacher bundled --json --reductions 1 2 3 --embed-dims 64 128
  wecolora plan --teacher vit_base_patch16_224 --device cuda --batch-size 64 --latency-ms 5 --output runs/plan-b16
  wecolora plan --teacher bundled --runtime onnxruntime --params 4e5  # timed in ONNX Runtime (the onnx extra)
then: wecolora distill ... --speedup 3 (the same rule chooses one shape) or --reduction R --embed-dim D --mlp-hidden M
"""


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="candidate student shapes (depth x width) measured on this device, with the "
                                    "Pareto front and a budget",
                       description="Enumerate student shapes of a teacher (the depths of --reductions x residual widths "
                                   "in whole heads x MLP hidden sizes), build each merged student without training, and "
                                   "measure it on the device: latency per batch (median of the timed calls after "
                                   "warm-up, in interleaved rounds), throughput, parameters, FLOPs per image, peak "
                                   "memory. Prints the table with the Pareto front (no other shape is both faster and "
                                   "larger) and, with a budget, the shapes within it and the one distill would choose.",
                       epilog=PLAN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="timm name, local-dir:FOLDER, run folder, bundled or bundled-mae "
                                                    "(weights not loaded)")
    p.add_argument("--img-size", type=int, help="input size (default: the teacher's)")
    p.add_argument("--device", choices=DEVICES, help="auto (default): cuda when available")
    p.add_argument("--runtime", choices=RUNTIMES, help="torch (default) or onnxruntime (each candidate exported first)")
    p.add_argument("--batch-size", type=int, help="images per timed call (default 32)")
    p.add_argument("--reductions", type=int, nargs="+", metavar="R", help="depths ceil(L / R) (default 1 2 3 4)")
    p.add_argument("--keep", help="first (default) or last: the blocks each reduction keeps (latency depends on their "
                                  "number only); a list such as 0,3,7: that depth only")
    p.add_argument("--embed-dims", type=int, nargs="+", metavar="D",
                   help="residual widths, multiples of the head size (default: 1/4, 1/2, 3/4 and all the heads)")
    p.add_argument("--mlp-hiddens", type=int, nargs="+", metavar="M",
                   help="MLP hidden sizes (default: 1/4, 1/2, 3/4 and all the neurons)")
    p.add_argument("--rounds", type=int, help="interleaved rounds over the candidates (default 3)")
    p.add_argument("--calls", type=int, help="timed calls per candidate and round (default 10)")
    p.add_argument("--warmup", type=int, help="untimed calls per candidate first (default 3)")
    p.add_argument("--no-memory", dest="memory", action="store_false", default=None,
                   help="skip the peak memory (one profiled call per candidate)")
    add_budget_arguments(p)
    p.add_argument("--output", metavar="DIR", help="write DIR/plan.json, plan.csv and chart.png (latency vs parameters)")
    p.add_argument("--json", action="store_true", help="print one JSON list, one object per candidate")
    p.set_defaults(handler=run_plan)


def run_plan(args) -> int:
    from wecolora.bench.report import format_plan

    flags = {k: v for k, v in vars(args).items() if k not in ("handler", "command", "json")}
    config = build_config(PlanConfig, None, **flags)
    progress = (lambda message: print(message, file=sys.stderr)) if not args.json else (lambda message: None)
    result = api.plan(config, progress=progress)
    print(json.dumps(result["candidates"]) if args.json else format_plan(result))
    return 0


PRETRAIN_EXAMPLES = """examples:
  # the bundled teacher's recipe (12 blocks, width 128, patch 7) on Fashion-MNIST
  wecolora pretrain --data fashion-mnist --output runs/teacher
  # a quick smaller one on the CPU
  wecolora pretrain --data mnist-5k --output runs/t-small --depth 6 --epochs 10 --batch-size 128

  # self-supervised (MAE, no labels; kNN top-1 as the monitor); on one GPU. lr by MAE's rule:
  # 1.5e-4 x 2048 / 256 = 1.2e-3; fixed sin-cos positions and MAE's init (the shipped bundled-mae: learned, timm)
  wecolora pretrain --objective mae --data fashion-mnist --output runs/teacher-mae \\
      --epochs 400 --warmup-epochs 20 --batch-size 2048 --eval-every 50
  # then distill it: wecolora distill --teacher runs/teacher-mae --data fashion-mnist --output runs/mae-r2
"""


def add_pretrain_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="train a teacher ViT, with labels or as a masked autoencoder (how the "
                                        "bundled teachers were made)",
                       description="Train a timm ViT from scratch. --objective supervised (default, the bundled "
                                   "teacher): cross-entropy on the labels. --objective mae (the bundled-mae teacher): "
                                   "masked-autoencoder reconstruction without labels; only the encoder is saved, "
                                   "headless. For fashion-mnist and mnist-5k the MAE augmentation (RandomResizedCrop "
                                   "0.2-1 + flip) runs batched on the device.",
                       epilog=PRETRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", dest="config_file", metavar="FILE.yaml", help="settings file (defaults < file < flags)")
    p.add_argument("--data", help="supervised: a labelled source with a test split (class folders, fashion-mnist, "
                                  "mnist-5k); mae: any source, labels optional (" + DATA_HELP + ")")
    add_source_arguments(p)
    p.add_argument("--output", metavar="DIR", help="writes DIR/model (timm folder), summary.csv, config.yaml")
    p.add_argument("--objective", choices=("supervised", "mae"),
                   help="supervised (default): labels, test top-1 monitor; mae: masked autoencoder, no labels, "
                        "kNN top-1 monitor")
    p.add_argument("--model", help="timm ViT architecture whose sizes are overridden (default vit_tiny_patch16_224)")
    for name, what in (("img-size", "input size (default 28)"), ("patch-size", "default 7"),
                       ("embed-dim", "width (default 128)"), ("depth", "blocks (default 12)"),
                       ("num-heads", "default 4"), ("epochs", "default 100"), ("batch-size", "default 256"),
                       ("warmup-epochs", "default 5, shortened to fit shorter runs"),
                       ("shift", "supervised: random translation in pixels (default 2)"),
                       ("eval-every", "monitor (test or kNN top-1) every N epochs (default 5)"), ("seed", "default 0"),
                       ("num-workers", "data loader workers"),
                       ("decoder-dim", "mae: decoder width (default 64)"),
                       ("decoder-depth", "mae: decoder blocks (default 4)")):
        p.add_argument(f"--{name}", type=int, help=what)
    for name, what in (("lr", "peak AdamW lr, absolute (default: mae: blr x batch x processes / 256, MAE's rule; "
                               "supervised: 1e-3)"),
                       ("blr", "mae: base lr of MAE's rule (default 1.5e-4)"),
                       ("weight-decay", "default 0.05"), ("label-smoothing", "supervised: default 0.1"),
                       ("mask-ratio", "mae: share of patches hidden from the encoder (default 0.75)")):
        p.add_argument(f"--{name}", type=float, help=what)
    p.add_argument("--no-norm-pix-loss", dest="norm_pix_loss", action="store_false", default=None,
                   help="mae: predict raw pixels instead of per-patch normalised ones")
    p.add_argument("--pos-embed", choices=POS_EMBEDS,
                   help="encoder positions: sincos (fixed 2-D sine-cosine, MAE's; default for mae) or learned "
                        "(timm's; default for supervised, and how the shipped bundled-mae was trained)")
    p.add_argument("--init", choices=INITS,
                   help="weight init: mae (MAE's xavier-uniform; default for mae) or timm (timm's ViT init; default "
                        "for supervised, and the shipped bundled-mae's)")
    p.add_argument("--precision", choices=PRECISIONS, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", choices=DEVICES, help="auto (default): cuda when available")
    p.add_argument("--resume", metavar="auto|PATH", help="continue an interrupted run (auto: DIR/checkpoint)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace a trained model in --output")
    p.set_defaults(handler=run_pretrain)


def run_pretrain(args) -> int:
    flags = {k: v for k, v in vars(args).items() if k not in ("handler", "config_file", "command")}
    config = build_config(PretrainConfig, args.config_file, **flags)
    result = api.pretrain(config)
    monitor = MONITORS[config.objective]
    score = (f"{monitor.replace('_', ' ')} {result[monitor]:.4f}" if result.get(monitor) is not None
             else "no labels: no kNN monitor")
    print(f"done: {result['output']}/model ({score})")
    return 0


EVAL_EXAMPLES = """examples:
  wecolora probe --model runs/student --data fashion-mnist --output runs/student/probe-fm
  # a multi-label csv (ChestX-ray14's 'Finding Labels': Effusion|Mass): BCE per label, mean ROC-AUC in results.json
  wecolora probe --model runs/student --data train.csv --test-data test.csv --image-column 'Image Index' \
      --label-column 'Finding Labels' --output runs/student/probe-cxr
  wecolora probe --model bundled --data mnist-5k --output runs/teacher-probe --protocol mae --epochs 50 --lr 4
  # the dense probe: patch tokens, a 1x1 head, mIoU (built-in canvases of Fashion-MNIST items, or a folder
  # D/train/images/*.png + D/train/masks/*.png, the same under D/val or D/test; 255 = ignore)
  wecolora probe --task segmentation --model runs/student --data fashion-mnist-seg --output runs/student/seg
  wecolora knn --model runs/student --data mnist-5k --output runs/student/knn --k 20
  wecolora report runs/student/probe-fm runs/teacher-probe --output runs/report
"""


def add_eval_parsers(sub) -> None:
    for command, what in (("probe", "linear probe of a frozen model"), ("knn", "weighted kNN on frozen features")):
        p = sub.add_parser(command, help=what, epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--model", required=True, help="run folder, student/ folder, or teacher spec (e.g. bundled, bundled-mae)")
        p.add_argument("--data", required=True, help="a labelled source with train and test splits (class folders, a "
                                                     "datasets folder with a test split, fashion-mnist, mnist-5k), "
                                                     "or the training images with --test-data"
                       + ("; with --task segmentation: image + mask pairs, or fashion-mnist-seg, mnist-5k-seg"
                          if command == "probe" else ""))
        p.add_argument("--test-data", metavar="SPEC",
                       help="the test images, when --data has no test split (a csv list, shards, a folder...); "
                            "labels are matched to --data's by name")
        add_source_arguments(p)
        p.add_argument("--output", required=True, metavar="DIR", help="writes DIR/results.json")
        p.add_argument("--device", choices=DEVICES, default="auto")
        # probe options default to None: ProbeConfig holds the one set of defaults
        p.add_argument("--pooling", choices=POOLINGS, default=None if command == "probe" else "cls",
                       help="CLS token after the final norm (default) or mean of patch tokens")
        p.add_argument("--num-workers", type=int, default=None if command == "probe" else 0,
                       help="data loader workers for feature extraction (default 0)")
        p.add_argument("--cache-dir", help="feature cache (default $WECOLORA_CACHE_DIR/features, else ~/.cache/wecolora/features)")
        p.add_argument("--max-unreadable", type=float, default=None if command == "probe" else 0.05,
                       help="share of a split's images that may be unreadable, skipped and counted (default 0.05)")
        if command == "probe":
            p.add_argument("--task", choices=PROBE_TASKS,
                           help="classification (default): CLS features, top-1; segmentation: a 1x1 head on the patch "
                                "tokens after the final norm, per-pixel cross-entropy, mIoU, pixel accuracy and "
                                "per-class IoU")
            p.add_argument("--img-size", type=int,
                           help="run the model at this input size (timm resizes the position embedding); default: "
                                "its own, or the canvas of a built-in segmentation set (56)")
            p.add_argument("--protocol", choices=PROBE_PROTOCOLS,
                           help="cached: head on cached features (default, fast); mae: the paper's, backbone every epoch")
            p.add_argument("--optimizer", choices=PROBE_OPTIMIZERS,
                           help="lars (default): MAE's LARS, trust ratio on the weight matrix; sgd: SGD + momentum "
                                "(the behaviour of wecolora 0.1.0)")
            p.add_argument("--epochs", type=int, help="default 50; the last epoch's test score is reported")
            p.add_argument("--batch-size", type=int,
                           help="default 512 (segmentation 64); when the lr is swept, at most 1/16 of the training "
                                "images (at least 32) so that every epoch makes 16 updates")
            p.add_argument("--lr", type=float,
                           help="fixes the peak lr; default: MAE's rule 0.1 x batch / 256 from 100,000 training images "
                                "on, else chosen by a sweep (0.2, 0.8, 3.2, 12.8, 51.2) scored on 20%% of the training images "
                                "held aside, then trained on all of them; results.json records lr_source and lr_sweep "
                                "(see docs/evaluation.md)")
            p.add_argument("--warmup-epochs", type=int, help="default min(10, epochs / 5)")
            p.add_argument("--val-fraction", type=float, help="carve a validation split from train (default 0)")
            p.add_argument("--train-per-class", type=int, help="probe on a fixed number of training images per class")
            p.add_argument("--augment", action="store_true", default=None, help="mae protocol: train on augmented images")
            p.add_argument("--seed", type=int, help="head init, batch order, train_per_class choice (default 0)")
        else:
            p.add_argument("--k", type=int, default=20)
            p.add_argument("--temperature", type=float, default=0.07)
        p.set_defaults(handler=run_eval)
    p = sub.add_parser("report", help="gather results.json files into one markdown table and CSV",
                       epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="folders holding results.json")
    p.add_argument("--output", required=True, metavar="DIR", help="writes DIR/report.md and DIR/report.csv")
    p.set_defaults(handler=run_report)


def run_eval(args) -> int:
    options = {k: v for k, v in vars(args).items()
               if k not in ("handler", "command", "model", "data", "test_data", "output", "device")}
    evaluate = api.probe if args.command == "probe" else api.knn
    config = build_config(ProbeConfig if args.command == "probe" else KnnConfig, None, **options)
    results = evaluate(args.model, args.data, args.output, config, device=args.device, test_data=args.test_data)
    lr = {"sweep": f", lr {results['lr']:.3g} chosen by a sweep", "rule": f", lr {results['lr']:.3g} by the rule"}.get(
        results.get("lr_source"), "")
    flag = " UNDER-TRAINED (see the warning)" if results.get("under_trained") else ""
    score = (f"mIoU {100 * results['miou']:.2f}%, pixel accuracy {100 * results['pixel_accuracy']:.2f}%"
             if "miou" in results else
             f"mean ROC-AUC {100 * results['auc']:.2f}% over {results['labels']} labels" if "auc" in results
             else f"top-1 {100 * results['top1']:.2f}%")
    print(f"{args.command} {args.model} on {args.data}: {score} "
          f"(n_train {results['n_train']}, n_test {results['n_test']}{lr}){flag} -> {args.output}/results.json")
    return 0


def run_report(args) -> int:
    print(api.report(args.runs, args.output))
    return 0


ABLATE_EXAMPLES = """examples:
  wecolora ablate --preset demo --output runs/demo
  wecolora ablate --preset lr-sweep --output runs/lr-sweep           # probe top-1 against the peak lr, 3 seeds
  wecolora ablate --preset lr-sweep --quick --output /tmp/lr-sweep
  wecolora ablate --preset paper-table-a-toy --output runs/table-a-toy  # the MAE teacher (bundled-mae), 3 seeds
  wecolora ablate --preset dense-study --output runs/dense             # CLS top-1 beside segmentation mIoU
  wecolora ablate --preset demo --probe-data fashion-mnist mnist-5k fashion-mnist-seg --output runs/demo-dense
  wecolora ablate --preset paper-table-a --data /data/imagenet --probe-data /data/imagenet /data/cifar100 --output runs/table-a
  wecolora ablate --config my-grid.yaml --output runs/grid
a grid file holds teacher, distill_data, probe_data, distill: {...}, probe: {...}, reference: [teacher, copy],
(a probe_data entry may be a segmentation set, e.g. fashion-mnist-seg or {data: D, task: segmentation, epochs: 20}:
its column is the dense probe's mIoU)
seeds: [0, 1, 2] (each run once per seed; cells are mean ± std) and runs: [{mode, reduction, ratio, ...}]
(any distill setting per run, e.g. lr; a run may give its own seeds). See the presets' files.
the grid's runs share the teacher cache (one entry per teacher, subset and seed; `teacher_cache: off` under
distill: turns it off; `wecolora cache list` shows it).
"""


def add_ablate_parsers(sub) -> None:
    p = sub.add_parser("ablate", help="run a grid of distillations and probes; write report.md, results.csv, chart.png",
                       epilog=ABLATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="a preset name: demo, lr-sweep, paper-table-a-toy (offline), paper-table-a, "
                                    "paper-table-b, ... (ImageNet settings; need the data and a GPU)")
    p.add_argument("--config", dest="config_file", metavar="FILE.yaml", help="a grid file in the presets' format")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--teacher", help="override the preset's teacher")
    p.add_argument("--data", dest="distill_data", help="override the preset's distillation set")
    p.add_argument("--probe-data", nargs="+", help="override the preset's probe sets")
    p.add_argument("--quick", action="store_true", help="the preset's reduced variant")
    p.add_argument("--shard", metavar="K/N", help="run only every N-th run starting at K, and no report (N processes "
                                                  "or machines sharing one --output; then one call without --shard "
                                                  "reuses everything and writes the report)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.set_defaults(handler=run_ablate)
    p = sub.add_parser("demo", help="the embedded default end to end: bundled teacher, offline data, a results table",
                       description="Distill the bundled Fashion-MNIST teacher with every mode (scratch KD, WeCo+KD, "
                                   "plain LoRA, WeCoLoRA) at 1% and 10% of the images with the paper's peak lr, probe "
                                   "every model with MAE's linear probe, print the table (3 seeds at 1%). Offline, "
                                   "14 minutes measured on 2 CPU cores; --quick 25 seconds.",
                       epilog="examples:\n  wecolora demo                  # writes runs/demo/report.md, results.csv, chart.png\n"
                              "  wecolora demo --quick --output /tmp/demo",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/demo", metavar="DIR", help="default runs/demo")
    p.add_argument("--quick", action="store_true", help="a reduced run (3 students, mnist-5k probes)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.set_defaults(handler=run_ablate, preset="demo", config_file=None, teacher=None, distill_data=None,
                   probe_data=None, shard=None)


def run_ablate(args) -> int:
    grid = api.load_ablation(args.preset, args.config_file, quick=args.quick, teacher=args.teacher,
                         distill_data=args.distill_data, probe_data=args.probe_data)
    shard = _parse_shard(args.shard)
    rows = api.ablate(grid, args.output, device=args.device, shard=shard)
    if shard != (0, 1):
        print(f"done: shard {args.shard} of the grid in {args.output} (run once more without --shard for the report)")
        return 0
    from wecolora.grid.ablate import markdown_table

    print(f"\n{markdown_table(rows)}\n\nreport: {args.output}/report.md, results.csv, chart.png")
    return 0


def _parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r} is invalid: expected K/N such as 0/3") from None
    return index, count  # the range is checked by ablate()


BENCH_EXAMPLES = """examples:
  wecolora bench                 # the full measurement (a few minutes on 2 CPU cores)
  wecolora bench --quick --json  # under 2 minutes; one JSON object on stdout
"""


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="distillation and inference speed against the paper's code design, on this machine",
                       description="Measure, in one run on this machine: distillation images/s of wecolora (teacher "
                                   "cache cold and warm, lean adapters, views cut on the device) against the reference "
                                   "design (fp32, teacher every step, unfused adapters) and against its own ceiling "
                                   "(the same loop on batches already on the device); FLOPs per image and TFLOP/s of "
                                   "each line, and step_flops_ratio (the wecolora step's FLOPs over a full fine-tune's); "
                                   "inference images/s of the merged students (r=2, 3) against the teacher and the "
                                   "unmerged adapter students; peak memory of each; and the cost of a 6-student "
                                   "ablation grid with and without the shared cache.",
                       epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer images and rounds (under 2 minutes on 2 cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--teacher", default="bundled", help="default: the bundled Fashion-MNIST teacher (or bundled-mae)")
    p.add_argument("--data", default="fashion-mnist", help="default fashion-mnist (mnist-5k if not installed)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="wecolora's precision; auto: fp32, plus bf16 where the hardware has fast bf16")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", type=int, help="images per epoch (default 2048, --quick 512)")
    p.add_argument("--rounds", type=int, help="interleaved repetitions (default 5, --quick 3)")
    p.add_argument("--output-dir", default="benchmarks/results", metavar="DIR",
                   help="where bench-*.json is written (default benchmarks/results)")
    p.set_defaults(handler=run_bench)


def run_bench(args) -> int:
    from wecolora.bench.report import format_table

    options = {k: v for k, v in vars(args).items() if k not in ("handler", "command", "json")}
    progress = (lambda message: print(message, file=sys.stderr)) if not args.json else (lambda message: None)
    result = api.bench(progress=progress, **options)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


EXPORT_EXAMPLES = """examples:
  wecolora export runs/fm-r2 --onnx                      # writes runs/fm-r2/student.onnx
  wecolora export runs/fm-r2 --onnx --output model.onnx
"""


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a run's merged student (ONNX, checked with onnxruntime)",
                       epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a run folder (its merged student/), a timm model folder or a spec")
    p.add_argument("--onnx", action="store_true", required=True, help="export to ONNX (the one format for now)")
    p.add_argument("--output", metavar="FILE.onnx", help="default RUN/student.onnx")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.set_defaults(handler=run_export)


def run_export(args) -> int:
    result = api.export(args.run, args.output, opset=args.opset)
    print(f"wrote {result['path']} (opset {result['opset']}; onnxruntime matches torch within "
          f"{result['max_abs_diff']:.2g} at batch sizes {', '.join(map(str, result['batches']))})")
    return 0


CACHE_EXAMPLES = """examples:
  wecolora cache list                          # every entry under $WECOLORA_CACHE_DIR (else ~/.cache/wecolora)
  wecolora cache list --json --cache-dir /scratch/wecolora-cache
  wecolora cache clear --older-than 30         # entries last used more than 30 days ago
  wecolora cache clear --all                   # every entry no running process uses
teacher entries (teacher/) and image stores (images/) are capped together at $WECOLORA_CACHE_MAX_GB
(default 50 GB; distill --cache-max-gb): the least recently used of either kind that no running process
uses are evicted when a run needs room; features/ is not counted.
"""


def add_cache_parser(sub) -> None:
    p = sub.add_parser("cache", help="list or clear the teacher-token, image-store and feature caches",
                       description="List or clear wecolora's caches: teacher tokens (teacher/), image stores "
                                   "(images/), probe features (features/) and any other kind under the cache root.",
                       epilog=CACHE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=Parser)
    for action, what in (("list", "each entry: size, views stored, last used, what it is keyed on"),
                         ("clear", "delete entries (those a running process uses are kept) and say what was freed")):
        a = actions.add_parser(action, help=what, epilog=CACHE_EXAMPLES,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        a.add_argument("--cache-dir", metavar="DIR", help="the cache root, or one cache's folder (default "
                                                          "$WECOLORA_CACHE_DIR, else ~/.cache/wecolora)")
        if action == "list":
            a.add_argument("--json", action="store_true", help="print one JSON object")
        else:
            a.add_argument("--older-than", type=float, metavar="DAYS", help="entries last used more than DAYS days ago")
            a.add_argument("--all", dest="everything", action="store_true", help="every entry")
        a.set_defaults(handler=run_cache)


def run_cache(args) -> int:
    import time

    from wecolora.cache.admin import cache_root, format_age, format_bytes

    def plural(n: int, word: str) -> str:
        return f"{n} {word if n == 1 else word[:-1] + 'ies' if word.endswith('y') else word + 's'}"

    def line(e) -> str:
        parts = [f"{e.kind}/{e.name}", format_bytes(e.bytes), *([plural(e.views, "view")] if e.views is not None else []),
                 f"last used {format_age(time.time() - e.last_used)}", *(f"{k}={v}" for k, v in e.key.items()),
                 *(["(in use)"] if e.busy else [])]
        return "  ".join(parts)

    root = cache_root(args.cache_dir)
    if args.action == "list":
        entries = api.cache_entries(args.cache_dir)
        total = sum(e.bytes for e in entries)
        if args.json:
            print(json.dumps({"root": str(root), "entries": [e.to_dict() for e in entries], "total_bytes": total}))
        else:
            print("\n".join([line(e) for e in entries] +
                            [f"{plural(len(entries), 'entry')}, {format_bytes(total)} in {root}"]))
        return 0
    removed, busy = api.clear_cache(args.cache_dir, older_than_days=args.older_than, everything=args.everything)
    for e in removed:
        print(f"removed {line(e)}")
    for e in busy:
        print(f"kept {e.kind}/{e.name} ({format_bytes(e.bytes)}): a running process uses it")
    print(f"freed {format_bytes(sum(e.bytes for e in removed))} ({plural(len(removed), 'entry')}) in {root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="wecolora", description="Few-shot distillation of Vision Transformers by weight copy "
                                                 "and low-rank adaptation (WeCoLoRA, WACV 2025).")
    parser.add_argument("--version", action="version", version=f"wecolora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    add_distill_parser(sub)
    add_inspect_parser(sub)
    add_views_parser(sub)
    add_plan_parser(sub)
    add_pretrain_parser(sub)
    add_eval_parsers(sub)
    add_ablate_parsers(sub)
    add_bench_parser(sub)
    add_export_parser(sub)
    add_cache_parser(sub)
    return parser


def one_line(err: Exception) -> str:
    """The user's message of a UserError, also when a data-loader worker wrapped it in its traceback text."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    return lines[-1].removeprefix(prefix) if len(lines) > 1 and lines[-1].startswith(prefix) else " ".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun only the first process logs and prints
    logging.getLogger("wecolora").setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            return args.handler(args)
    except UserError as err:
        print(f"wecolora: error: {one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a full disk or a read-only folder is the user's to fix, not a crash
        message = disk_error(err)
        if message is None:
            raise
        print(f"wecolora: error: {message}; free some space or choose another --output "
              f"(files written earlier are intact)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wecolora: interrupted (rerun with --resume auto to continue)", file=sys.stderr)
        return 130
