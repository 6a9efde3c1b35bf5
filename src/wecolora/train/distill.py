"""The distillation loop: a frozen teacher, a weight-copied student, an L1 on last-block tokens.

Reads top to bottom: resolve settings -> teacher and student plan -> the training set-up (student,
optimizer, schedule: :func:`wecolora.training.make_training`, shared with bench) -> data (the image store,
views cut on the device) -> (resume) -> epochs of steps -> checkpoint each epoch -> export the merged student.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from wecolora.cache.admin import CacheCap
from wecolora.cache.images import StoreBatches, open_store, store_loader
from wecolora.cache.teacher import SharedWriter, TeacherCache, open_for_run
from wecolora.config import KEEP_SEARCHES, WIDTH_FIELDS, DistillConfig, parse_keep, to_yaml
from wecolora.data.datasets import open_dataset
from wecolora.data.subset import drop_unreadable, few_shot_indices, subset_images, write_subset
from wecolora.data.transforms import eval_transform
from wecolora.data.views import ViewRecipe
from wecolora.distributed import all_agree
from wecolora.errors import UserError
from wecolora.export import export_run
from wecolora.files import atomic_write_text, csv_text
from wecolora.method.block_search import BlockChoice, choose_blocks
from wecolora.method.losses import feature_loss
from wecolora.method.plan import StudentPlan, check_settings, get_mode, plan_student, student_width
from wecolora.method.width import TeacherWidth, WidthChoice
from wecolora.runtime import loader_workers, make_accelerator, versions
from wecolora.teachers.load import load_model, model_shape
from wecolora.teachers.vit import last_block_tokens, use_fused_attention
from wecolora.train.checkpoint import load_checkpoint, resume_schedule, resume_source, save_checkpoint
from wecolora.train.run_folder import check_distill
from wecolora.train.setup import compile_by_default, make_training, plain_attention

_logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("epoch", "loss", "lr", "images_per_s", "seconds", "updates")
CHECK_EVERY = 10  # steps between reads of the loss (each read waits for the device to finish its queued work)


class NonFiniteLoss(UserError):
    """The loss stopped being a finite number; ``epoch`` and ``step`` are 1-based.

    ``step`` is the step at which it was noticed: the loss is read back every :data:`CHECK_EVERY` steps and at
    the end of the epoch, so it became non-finite at that step or up to ``CHECK_EVERY - 1`` steps before.
    """

    def __init__(self, value: float, epoch: int, step: int):
        super().__init__(f"the loss became {value} at epoch {epoch}, by step {step} (it is checked every "
                         f"{CHECK_EVERY} steps)")
        self.value, self.epoch, self.step = value, epoch, step


def make_plan(config: DistillConfig, teacher: nn.Module, dataset, indices: list[int], accelerator, *,
              resumed: bool = False) -> StudentPlan:
    """The run's student plan. A searched keep (auto, greedy, influence) chooses its blocks, and the activation
    ranking of a narrower student its channels, heads and neurons, from up to ``keep_images`` images of the
    subset (eval transform, unaugmented), once: a resumed run reuses the choices its ``config.yaml`` recorded,
    and every process takes the first process's choices."""
    keep = parse_keep(config.keep)  # checked against the teacher's shape before its weights were read
    widths = {name: getattr(config, name) for name in WIDTH_FIELDS}
    narrow = student_width(teacher, widths) is not None
    saved = Path(config.output) / "config.yaml"
    record = ((yaml.safe_load(saved.read_text()) or {}).get("resolved") or {}) if resumed and saved.is_file() else {}
    choice = width_choice = images = None
    if narrow and record.get("width_selection"):
        width_choice = WidthChoice.from_record(record["width_selection"])
    needs_images = (keep in KEEP_SEARCHES and record.get("block_search") is None) or (
        narrow and width_choice is None and config.width_ranking == "activation")
    if needs_images:
        images = subset_images(dataset, indices, eval_transform(teacher), count=config.keep_images, seed=config.seed)
    if keep in KEEP_SEARCHES:
        if record.get("block_search") is not None:
            choice = BlockChoice.from_record(record["block_search"])
            _logger.info("keep %s: reusing the recorded choice %s", keep, list(choice.kept))
        else:
            choice = choose_blocks(teacher, config.reduction, keep, images, seed=config.seed)
        if accelerator.num_processes > 1:  # GPUs may break near-ties differently: one choice for every process
            from accelerate.utils import broadcast_object_list

            choice = broadcast_object_list([choice])[0]
        if accelerator.is_main_process:
            _logger.info("keep %s chose blocks %s (%s); initial L1 on %d held-out images: %s", keep, list(choice.kept),
                         choice.chosen, choice.score_images,
                         ", ".join(f"{name} {c['kept']} {c['l1']:.4g}" for name, c in choice.candidates.items()))
    plan = plan_student(teacher, config.reduction, keep, config.mode, config.rank, alpha=config.lora_alpha,
                        choice=choice, seed=config.seed, images=images, width_ranking=config.width_ranking,
                        width_choice=width_choice, **widths)
    if plan.narrow and width_choice is None and accelerator.num_processes > 1:  # one width choice for every process
        from accelerate.utils import broadcast_object_list

        plan = dataclasses.replace(plan, width_choice=broadcast_object_list([plan.width_choice])[0])
    return plan


def distill(config: DistillConfig) -> dict:
    """Run one distillation as configured; returns the last epoch's metrics and the run's paths.

    Example:
        >>> from wecolora.config import DistillConfig
        >>> distill(DistillConfig(teacher="local-dir:teacher", data="fashion-mnist", output="runs/a"))  # doctest: +SKIP
    """
    output = check_distill(config)  # paths; refuses to clobber a finished or interrupted run unless asked
    # What the user gave is checked before any weight is read: the teacher's architecture on the meta
    # device, then the few-shot subset (unreadable images skipped, or refused beyond a threshold).
    if config.budget() is not None and not config.width_given():
        raise UserError(f"--{config.budget()[0].replace('_', '-')} is resolved into a shape by wecolora.api.distill "
                        f"(the planner); call it, or give the widths")
    check_settings(model_shape(config.teacher, img_size=config.img_size), config.reduction, config.keep,
                   config.mode, config.rank, config.lora_alpha, widths={n: getattr(config, n) for n in WIDTH_FIELDS})
    dataset = open_dataset(config.data, "train")
    indices = few_shot_indices(dataset.targets, ratio=None if config.per_class else config.ratio,
                                    per_class=config.per_class, seed=config.subset_seed,
                                    min_per_class=config.min_per_class, classes=dataset.classes)
    indices, unreadable = drop_unreadable(dataset, indices, max_fraction=config.max_unreadable,
                                                min_per_class=config.min_per_class)
    accelerator, precision = make_accelerator(config.device, config.precision, config.accum_steps)
    from accelerate.utils import set_seed

    set_seed(config.seed)
    checkpoint_dir = output / "checkpoint"
    resume_from = resume_source(checkpoint_dir, config.resume)

    # Models: the teacher is frozen, in eval mode, never wrapped. The student's plan (kept blocks, their
    # segments, rank) is resolved once here; a searched keep looks at the subset first.
    teacher = load_model(config.teacher, weights=config.teacher_weights, img_size=config.img_size)
    teacher.requires_grad_(False).to(accelerator.device)
    plan = make_plan(config, teacher, dataset, indices, accelerator, resumed=resume_from is not None and resume_from.is_dir())
    kept, depth = list(plan.kept), plan.teacher_blocks

    # The student, what its loss matches, AdamW without decay on 1-D params, warmup from 0 then per-iteration
    # cosine to 0: the set-up bench measures (training.make_training).
    world = accelerator.num_processes
    peak_lr = config.peak_lr(world)
    steps_per_epoch = math.ceil(len(indices) / (config.batch_size * world))  # each process's batches
    updates_per_epoch = math.ceil(steps_per_epoch / config.accum_steps)
    training = make_training(teacher, plan, lr=peak_lr, weight_decay=config.weight_decay, epochs=config.epochs,
                             warmup_epochs=config.warmup_epochs, updates_per_epoch=updates_per_epoch,
                             device=accelerator.device, precision=precision, match=config.match,
                             dropout=config.lora_dropout, use_dora=config.dora, use_rslora=config.rslora,
                             width_loss=config.width_loss)
    student, optimizer, scheduler = training.student, training.optimizer, training.scheduler
    student_blocks, teacher_blocks, norm = training.student_blocks, training.teacher_blocks, training.norm

    # Data: the few-shot subset decoded once into a memory-mapped store (reused by every run on this subset),
    # and the paper's augmentation cut from it on the device, with the teacher's own mean/std. View v of image i
    # is reproducible (its crop and flip are drawn from (seed, v, i)) and epoch e shows view e mod K, so the
    # teacher's tokens for it can be cached on disk once and reused by every later epoch, student and rerun.
    recipe = ViewRecipe.for_model(teacher)
    num_workers = loader_workers(config.num_workers)
    cap = CacheCap.resolve(config.cache_max_gb, config.teacher_cache_dir)  # one cap over the store and the cache
    with accelerator.local_main_process_first():  # one process per machine decodes; the others open its store
        store = open_store(dataset, indices, bound=recipe.bound, num_workers=num_workers,
                           progress=accelerator.is_local_main_process, teacher_cache_dir=config.teacher_cache_dir,
                           cap=cap)
    n_views = config.cache_views or config.epochs
    # Cached where it is read back (an ablate grid, or --cache-teacher on / --teacher-cache DIR), not for a lone run.
    cache = open_for_run(
        config.uses_teacher_cache(), config.teacher_cache_dir, teacher=teacher, dataset=dataset, indices=indices,
        transform=recipe, seed=config.seed, teacher_blocks=teacher_blocks, norm=norm, precision=precision,
        views=n_views, cap=cap)
    generator = torch.Generator()  # reseeded every epoch: the order depends on (seed, epoch) only

    def epoch_loader(view: int, tokens_from: TeacherCache | None):
        batches = StoreBatches(store, indices, recipe, seed=config.seed, view=view, cache=tokens_from)
        loader = store_loader(batches, config.batch_size, generator, num_workers=num_workers,
                                          pin_memory=accelerator.device.type == "cuda")
        # Sharded across processes; train_one_epoch moves each batch itself, without waiting for the device
        # (accelerate's placement copies synchronously, which would stall the device's queue every step).
        return accelerator.prepare_data_loader(loader, device_placement=False)

    if plain_attention(accelerator.device, precision):
        use_fused_attention([teacher], False)
    compiled = config.compile if config.compile is not None else compile_by_default(accelerator.device)
    # Static shapes: at most two graphs per run (the full batch and an epoch's shorter last batch).
    matcher = torch.compile(training.matcher, dynamic=False) if compiled else training.matcher
    model, optimizer = accelerator.prepare(matcher, optimizer)

    resolved = {
        **plan.record(), "lr": peak_lr, "precision": precision, "device": str(accelerator.device),
        "world_size": world, "effective_batch": config.effective_batch(world),
        "matched_student_blocks": student_blocks, "matched_teacher_blocks": teacher_blocks,
        "images": len(indices), "unreadable_images": len(unreadable), "updates_per_epoch": updates_per_epoch,
        "num_workers": num_workers, "data_path": "image store, views cut on the device", "image_store": store.record(),
        "views": n_views, "teacher_cache": str(cache.folder) if cache else None,
        "lean_adapters": training.lean_adapters, "compiled": compiled, "versions": versions(),
    }
    start_epoch, updates, rows = 0, 0, []
    if resume_from is not None and resume_from.is_dir():
        progress = load_checkpoint(resume_from, training.trained, optimizer, scheduler)
        start_epoch, updates, rows = progress["epoch"], progress["updates"], progress["rows"]
        _logger.info("resuming from %s after epoch %d", resume_from, start_epoch)
        scheduler, updates = resume_schedule(optimizer, scheduler, progress, epochs=config.epochs, lr=peak_lr,
                                             warmup_epochs=config.warmup_epochs, updates_per_epoch=updates_per_epoch)
    elif accelerator.is_main_process:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # --overwrite of an interrupted run
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output / "config.yaml", to_yaml(config, **resolved))
        write_subset(output / "subset.txt", dataset, indices)
        _logger.info("%s: %d of %d images, %d blocks kept of %d (%s, keep %s), %s", config.mode, len(indices),
                     len(dataset), len(kept), depth, kept, plan.keep, get_mode(config.mode).description)
        if plan.narrow:
            w, full = plan.student_width, TeacherWidth.of(teacher)
            _logger.info("width: %d of %d channels (%d of %d heads), %d of %d MLP neurons (ranking %s); loss on %s",
                         w.embed_dim, full.embed_dim, w.heads, full.heads, w.mlp_hidden, full.mlp_hidden,
                         plan.width_choice.ranking,
                         "the kept channels" if training.channels is not None else
                         "a learned projection to the teacher's width" if training.projector is not None else
                         "every channel (the residual width is the teacher's)")
        _logger.info("effective batch %d = %d x %d accumulation x %d processes; lr %.3g%s", config.effective_batch(world),
                     config.batch_size, config.accum_steps, world, peak_lr,
                     "" if config.lr else f" = blr {config.blr:g} x {config.effective_batch(world)} / 256")

    bar = tqdm(total=config.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch, unit="batch",
               disable=not accelerator.is_main_process, desc="distill")
    for epoch in range(start_epoch, config.epochs):
        set_seed(config.seed + epoch)
        generator.manual_seed(config.seed + epoch)
        view, tokens_from, writer = epoch % n_views, None, None
        # A view's tokens are read when every process sees them (a node-local cache dir may hold them on some nodes only).
        if cache is not None and all_agree(cache.has_view(view)):
            tokens_from = cache
        elif cache is not None:
            writer = cache.writer(view, len(indices))
            if accelerator.num_processes > 1:  # every process's rows, stored by the first
                writer = SharedWriter(writer, accelerator)
        try:
            metrics, updates = train_one_epoch(model, teacher, epoch_loader(view, tokens_from), optimizer, scheduler,
                                               accelerator, bar, recipe=recipe, teacher_blocks=teacher_blocks,
                                               norm=norm, loss_kind=config.loss, updates=updates, epoch=epoch,
                                               writer=writer, channels=training.channels)
            if writer is not None and writer.commit():
                _logger.info("teacher cache: view %d of %d stored in %s", view, n_views, cache.folder)
        except NonFiniteLoss as err:
            bar.close()
            if checkpoint_dir.is_dir():
                advice = (f"the checkpoint after epoch {epoch} is kept in {checkpoint_dir}: continue from it with "
                          f"--resume auto and a lower --blr/--lr, or --precision fp32")
            else:
                advice = "no epoch had finished, so there is no checkpoint: rerun with a lower --blr/--lr, or --precision fp32"
            raise UserError(f"{err}; {advice}") from None
        finally:
            if writer is not None:
                writer.abort()  # no-op once committed; otherwise no half-written view is left behind
        rows.append({"epoch": epoch + 1, **metrics, "updates": updates})
        if accelerator.is_main_process:
            atomic_write_text(output / "summary.csv", csv_text(rows, SUMMARY_COLUMNS))
            save_checkpoint(checkpoint_dir, training.trained, optimizer, scheduler,
                            {"epoch": epoch + 1, "updates": updates, "rows": rows,
                             "updates_per_epoch": updates_per_epoch, "lr": peak_lr})
        accelerator.wait_for_everyone()
    bar.close()

    info = {"teacher": config.teacher, "teacher_weights": config.teacher_weights, "keep": config.keep,
            "adapter_targets": list(plan.adapter_targets or ()), "match": config.match, "loss": config.loss}
    if accelerator.is_main_process:
        export_run(student, output, plan, info)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return {"output": str(output), "epochs": rows, "unreadable_images": unreadable, **info, **plan.record()}


def train_one_epoch(model, teacher, loader, optimizer, scheduler, accelerator, bar, *, recipe, teacher_blocks, norm,
                    loss_kind, updates, epoch, writer=None, channels=None) -> tuple[dict, int]:
    """One pass over the subset; returns ``({loss, lr, images_per_s, seconds}, updates)``.

    Batches are :class:`wecolora.image_store.StoreBatches` items: each view is cut from the canvas rows here,
    on the device (``recipe``). The teacher's tokens come with the batch (a cached view) or are computed and
    handed to ``writer``, whose rounded copy is what the loss sees (a cold run equals a warm rerun). The loss
    is summed on the device and read back (checked, shown on the bar) every :data:`CHECK_EVERY` steps and at
    the end: a read waits for the device, so reading every step would stall its queue.
    """
    model.train()
    loss_sum = torch.zeros((), device=accelerator.device)
    images_seen, shown, start = 0, 0, time.perf_counter()

    def read_loss(step: int, loss: torch.Tensor) -> None:
        nonlocal shown
        total, last = torch.stack([loss_sum, loss]).tolist()  # one host-device synchronisation
        if not math.isfinite(total):
            raise NonFiniteLoss(last if not math.isfinite(last) else total, epoch + 1, step)
        bar.update(step - shown)
        shown = step
        bar.set_postfix(epoch=epoch + 1, loss=f"{last:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        img_s=f"{images_seen / (time.perf_counter() - start):.0f}")

    step = 0
    for step, batch in enumerate(loader, start=1):
        # Copies from pinned memory that do not wait for the device; positions stay on the host (the writer's rows).
        pixels, boxes, flips = (batch[k].to(accelerator.device, non_blocking=True) for k in ("pixels", "boxes", "flips"))
        images = recipe.apply(pixels, boxes, flips)
        with accelerator.accumulate(model):
            if "tokens" in batch:  # a cached view: [B, N, D] per matched block
                targets = [t.to(accelerator.device, non_blocking=True).float() for t in batch["tokens"]]
            else:
                with torch.no_grad(), accelerator.autocast():
                    targets = last_block_tokens(teacher, images, teacher_blocks, norm=norm)
                if writer is not None:
                    targets = writer.write(batch["positions"], targets)
            with accelerator.autocast():
                predictions = model(images)
            out = feature_loss(predictions, targets, loss_kind, channels=channels)
            accelerator.backward(out["loss"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            updates += 1
            scheduler.step_update(updates)
        loss_sum += out["loss"].detach()
        images_seen += images.shape[0] * accelerator.num_processes
        if step % CHECK_EVERY == 0:
            read_loss(step, out["loss"].detach())
    if step % CHECK_EVERY:
        read_loss(step, out["loss"].detach())
    seconds = time.perf_counter() - start
    mean_loss = accelerator.reduce(loss_sum / max(1, step), reduction="mean").item()
    return {"loss": mean_loss, "lr": optimizer.param_groups[0]["lr"], "images_per_s": images_seen / seconds,
            "seconds": seconds}, updates
