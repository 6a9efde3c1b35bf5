"""Does the planner's latency for a shape agree with a separate timing of the exported student of that shape?

The planner (``wecolora plan``) times a random-weights timm ViT of the shape; here the trained student a run
exported (``RUN/student``, loaded by timm alone) is timed the same way (median of every call after warm-up)
by its own loop, in torch and in ONNX Runtime (the file ``wecolora export RUN --onnx`` writes). The planner and
the separate timings alternate, round after round, so that a busy spell of a shared machine hits both.

Example:
    OMP_NUM_THREADS=1 python benchmarks/plan_agreement.py runs/shape-study/runs/wecolora-r1-a0.01-s0-d64-activation
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from wecolora.bench.planner import plan_shapes
from wecolora.config import PlanConfig
from wecolora.export import export_onnx
from wecolora.teachers.load import load_model


def time_calls(fn, calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished run folder (its student/ and adapter/wecolora.json)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--alternations", type=int, default=4, help="planner round, separate round, repeated")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch")
    args = parser.parse_args()

    run = Path(args.run)
    info = json.loads((run / "adapter" / "wecolora.json").read_text())
    student = load_model(str(run)).eval()
    shape = {"depth": len(student.blocks), "embed_dim": student.embed_dim, "mlp_hidden": student.blocks[0].mlp.fc1.out_features}
    plan = PlanConfig(teacher=info["teacher"], device="cpu", runtime=args.runtime, batch_size=args.batch_size,
                      keep=",".join(map(str, info["kept_blocks"])), embed_dims=[shape["embed_dim"]],
                      mlp_hiddens=[shape["mlp_hidden"]], rounds=1, calls=args.calls, warmup=args.warmup, memory=False)
    images = torch.randn(args.batch_size, 3, *student.patch_embed.img_size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        if args.runtime == "onnxruntime":
            import onnxruntime

            path = export_onnx(str(run), Path(tmp) / "student.onnx")["path"]
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            feed = {session.get_inputs()[0].name: images.numpy()}

            def separate():
                session.run(None, feed)
        else:
            def separate():
                with torch.inference_mode():
                    student(images)

        planned, timed = [], []
        for _ in range(args.alternations):
            result = plan_shapes(plan, progress=lambda message: None)
            row = next(r for r in result["candidates"] if all(r[k] == v for k, v in shape.items()))
            planned.append(row["latency_ms"])  # the median of this round's calls
            timed.append(1000 * statistics.median(time_calls(separate, args.calls, args.warmup)))
    planner_ms, separate_ms = statistics.median(planned), statistics.median(timed)
    print(json.dumps({"run": str(run), "shape": shape, "batch_size": args.batch_size, "runtime": args.runtime,
                      "threads": torch.get_num_threads(), "planner_ms": planner_ms, "separate_ms": separate_ms,
                      "ratio": planner_ms / separate_ms, "planner_rounds_ms": planned, "separate_rounds_ms": timed},
                     indent=1))


if __name__ == "__main__":
    main()
