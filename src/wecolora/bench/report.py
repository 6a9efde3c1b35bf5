"""The table ``wecolora bench`` prints from its results."""
from __future__ import annotations


def _distill_lines(result: dict) -> list[str]:
    d, peak = result["distill"], result["machine"].get("bf16_peak_tflops")
    lines = [f"{'distillation, r=2, all six adapters':<44}{'images/s':>10}{'vs ref':>8}{'of ceiling':>11}"
             f"{'GFLOP/img':>11}{'TFLOP/s':>9}{'of peak' if peak else '':>9}{'peak MB':>9}"]
    names = {"reference": "reference design (fp32, teacher every step)"}
    for p in result["precisions"]:
        names[f"{p}_cold_ceiling"] = f"wecolora {p}, cold ceiling (data on device)"
        names[f"{p}_cold"] = f"wecolora {p}, teacher cache cold"
        names[f"{p}_warm_ceiling"] = f"wecolora {p}, warm ceiling (data on device)"
        names[f"{p}_warm"] = f"wecolora {p}, teacher cache warm"
    for key, label in names.items():
        row = d[key]
        of_ceiling = f"{row['of_ceiling']:.2f}" if "of_ceiling" in row else ""
        of_peak = f"{row['fraction_of_bf16_peak']:.1%}" if peak else ""
        lines.append(f"  {label:<42}{row['images_per_s']:>10.0f}{row['speedup']:>7.2f}x{of_ceiling:>11}"
                     f"{row['gflop_per_image']:>11.3f}{row['tflops']:>9.3f}{of_peak:>9}{row['peak_mb']:>9.1f}")
    return lines


def _inference_lines(result: dict) -> list[str]:
    inf = result["inference"]
    lines = [f"{'inference, fp32, batch ' + str(result['batch_size']):<44}{'images/s':>10}{'vs teacher':>12}"
             f"{'GFLOP/img':>11}{'TFLOP/s':>9}{'peak MB':>9}{'weights MB':>12}"]
    labels = {"teacher": f"teacher ({result['teacher_blocks']} blocks)"}
    for r in (2, 3):
        labels[f"adapters_r{r}"] = f"r={r} student, adapters unmerged"
        labels[f"merged_r{r}"] = f"r={r} student, merged (limit {inf[f'merged_r{r}']['limit']:.2f}x)"
    for key, label in labels.items():
        row = inf[key]
        lines.append(f"  {label:<42}{row['images_per_s']:>10.0f}{row['speedup']:>11.2f}x{row['gflop_per_image']:>11.3f}"
                     f"{row['tflops']:>9.3f}{row['peak_mb']:>9.1f}{row['weights_mb']:>12.1f}")
    return lines


def format_table(result: dict) -> str:
    """The printed report: throughput, ratios, FLOPs and peak memory per line, then the targets."""
    m, grid, f = result["machine"], result["grid"], result["flops"]
    lines = [
        f"wecolora bench: {m['cpu']} ({m['torch_threads']} threads, {m['cpu_count']} cores), {m['device']}"
        + (f" {m['gpu']}" if m.get("gpu") else "") + f", torch {m['torch']}",
        f"teacher {result['teacher']} ({result['teacher_blocks']} blocks, width {result['width']}), rank "
        f"{result['rank']}, {result['images']} images of {result['data']}, batch {result['batch_size']}, "
        f"best of {result['config']['rounds']} interleaved rounds",
        "",
        *_distill_lines(result),
        "(ceiling: the same loop on batches already on the device, no loader and no cache I/O)",
        "",
        f"step FLOPs per image (batch {f['batch']}), wecolora student (lean adapters) / full fine-tune of the "
        f"same student (weco-kd), r=2:",
        *(f"  {label}, rank {row['rank']}: {row['wecolora_gflop_per_image']:.3f} / "
          f"{row['full_finetune_gflop_per_image']:.3f} GFLOP = {row['step_flops_ratio']:.3f}"
          for label, row in (("this teacher", f), ("ViT-B/16 224 px", f["vit_b"]))),
        "",
        *_inference_lines(result),
        "(peak MB: tensor memory allocated during one step or forward, on top of the weights)",
        "",
        f"ablation grid, 6 students ({grid['precision']}), training seconds per epoch:",
    ]
    for row in grid["students"]:
        lines.append(f"  {row['mode'] + ' r=' + str(row['reduction']):<20} without cache {row['seconds_without_cache']:6.2f}"
                     f"   with the shared cache {row['seconds_with_cache']:6.2f} ({row['cache']})")
    lines.append(f"  total {grid['seconds_with_cache']:.2f} s vs {grid['seconds_without_cache']:.2f} s: cost ratio "
                 f"{grid['cost_ratio']:.2f}")
    lines += ["", "targets:"]
    for key, target in result["targets"].items():
        sign = "<=" if target.get("at_most") else ">="
        lines.append(f"  {key:<26}{result[key]:>6.2f} ({sign} {target['target']}: "
                     f"{'reached' if target['reached'] else 'NOT reached'})")
    if result.get("written_to"):
        lines += ["", f"written to {result['written_to']}"]
    return "\n".join(lines)


def format_plan(result: dict) -> str:
    """The table ``wecolora plan`` prints: one line per candidate, fastest first, the front and the budget marked."""
    budget = result.get("budget")
    lines = [f"wecolora plan: {result['architecture']} ({result['teacher']}), {result['runtime']} on {result['device']}, "
             f"batch {result['batch_size']}; latency = median of {result['rounds']} x {result['calls']} timed calls "
             f"after {result['warmup']} warm-up calls; FLOPs per image",
             "",
             f"{'depth':>5} {'width':>5} {'heads':>5} {'MLP':>5} {'params':>10} {'MFLOPs':>8} {'latency ms':>11} "
             f"{'images/s':>9} {'peak MB':>8} {'speed-up':>8}  front" + ("  budget" if budget else "")]
    for row in sorted(result["candidates"], key=lambda r: (r["latency_ms"], -r["params"])):
        peak = f"{row['peak_mb']:8.1f}" if row.get("peak_mb") is not None else f"{'-':>8}"
        mark = "  *    " if row["pareto"] else "       "
        fits = ("  yes" if row["within_budget"] else "  -") if budget else ""
        note = "  (teacher)" if row.get("teacher") else ""
        if result.get("chosen") is not None and all(row[k] == result["chosen"][k] for k in ("depth", "embed_dim", "mlp_hidden")):
            note += "  <- chosen"
        lines.append(f"{row['depth']:>5} {row['embed_dim']:>5} {row['heads']:>5} {row['mlp_hidden']:>5} "
                     f"{row['params']:>10,} {row['flops'] / 1e6:>8.2f} {row['latency_ms']:>11.3f} "
                     f"{row['throughput']:>9.0f} {peak} {row['speedup']:>7.2f}x{mark}{fits}{note}")
    lines += ["", "front (*): no other candidate is both at least as fast and at least as large"]
    if budget:
        chosen = result.get("chosen")
        within = sum(1 for r in result["candidates"] if r["within_budget"])
        lines.append(f"{budget['name']} {budget['value']:g}: {within} of {len(result['candidates'])} candidates within; "
                     + (f"distill would train depth {chosen['depth']}, width {chosen['embed_dim']} ({chosen['heads']} "
                        f"heads), MLP {chosen['mlp_hidden']}: {result['rule']}" if chosen else "none meets it"))
    return "\n".join(lines)
