"""The distillation loop: a frozen teacher, a weight-copied student, an L1 on last-block tokens.

:func:`distill` reads top to bottom: claim the run folder -> the few-shot subset -> teacher and student plan ->
the training set-up (student, optimizer, schedule: :func:`wecolora.train.setup.make_training`, shared with
bench) -> data (the image store, views cut on the device, the teacher cache) -> (resume) -> epochs of steps,
a checkpoint after each -> export the merged student.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
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
from wecolora.data.layout import parse_source
from wecolora.data.subset import MANIFEST, SubsetChoice, subset_images
from wecolora.data.transforms import eval_transform
from wecolora.data.views import ViewRecipe
from wecolora.distributed import all_agree
from wecolora.errors import UserError
from wecolora.evaluation.features import candidate_features
from wecolora.export import export_run
from wecolora.method.block_search import BlockChoice, choose_blocks
from wecolora.method.losses import feature_loss
from wecolora.method.plan import StudentPlan, check_settings, get_mode, plan_student, student_width
from wecolora.method.width import TeacherWidth, WidthChoice
from wecolora.runtime import loader_workers, make_accelerator, versions
from wecolora.teachers.load import load_model, model_shape
from wecolora.teachers.vit import last_block_tokens, use_fused_attention
from wecolora.train.checkpoint import load_checkpoint, resume_schedule, save_checkpoint
from wecolora.train.run_folder import RunFolder, claim_distill
from wecolora.train.setup import Training, compile_by_default, make_training, plain_attention

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
    from accelerate.utils import set_seed

    with claim_distill(config) as run:  # locked against another run; a finished or interrupted run needs asking
        check_student(config)
        subset = open_subset(config, run.path / MANIFEST if run.resume_from is not None else None)
        accelerator, precision = make_accelerator(config.device, config.precision, config.accum_steps)
        set_seed(config.seed)
        teacher = load_teacher(config, accelerator)
        choose_subset(subset, teacher, accelerator.device, accelerator.num_processes)
        plan = make_plan(config, teacher, subset.dataset, subset.indices, accelerator,
                         resumed=run.resume_from is not None)
        job = make_distillation(config, run, subset, teacher, plan, accelerator, precision)
        start_epoch, updates, rows = resume(job)
        if accelerator.is_main_process:
            write_run_files(job)
        rows = train_epochs(job, start_epoch, updates, rows)
        return export_student(job, rows)


@dataclass
class FewShotSubset:
    """The images a run trains on: rows ``indices`` of ``dataset`` (set by :func:`choose_subset`, once the
    teacher is loaded: a coreset needs its features); ``unreadable`` ones were skipped; ``choice`` is the
    subset rule (:class:`~wecolora.data.subset.SubsetChoice`), which writes ``subset.json``."""
    dataset: object
    choice: SubsetChoice
    indices: list[int] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def check_student(config: DistillConfig) -> None:
    """The student's settings against the teacher's architecture (on the meta device), before any weight is read."""
    if config.budget() is not None and not config.width_given():
        raise UserError(f"--{config.budget()[0].replace('_', '-')} is resolved into a shape by wecolora.api.distill "
                        f"(the planner); call it, or give the widths")
    check_settings(model_shape(config.teacher, img_size=config.img_size), config.reduction, config.keep,
                   config.mode, config.rank, config.lora_alpha, widths={n: getattr(config, n) for n in WIDTH_FIELDS})


def open_subset(config: DistillConfig, manifest: Path | None = None) -> FewShotSubset:
    """The few-shot subset's source and rule, checked before any weight is read: drawn, or a coreset's pool,
    unreadable images skipped or refused beyond a threshold; with ``manifest`` (a resumed run's ``subset.json``),
    the images it names. What ``distill``, ``wecolora views`` and a grid's untrained copies all train on."""
    dataset = open_dataset(config.data, "train", **config.source_options())
    choice = SubsetChoice.from_config(dataset, config, source=parse_source(config.data).record())
    if not (manifest is not None and choice.reuse(manifest)):
        choice.prepare()
    return FewShotSubset(dataset, choice)


def load_teacher(config: DistillConfig, accelerator) -> nn.Module:
    """The teacher: frozen, in eval mode, on the run's device, never wrapped."""
    teacher = load_model(config.teacher, weights=config.teacher_weights, img_size=config.img_size)
    teacher.requires_grad_(False).to(accelerator.device)
    return teacher


def choose_subset(subset: FewShotSubset, teacher: nn.Module | None, device, processes: int = 1) -> None:
    """The subset's images: drawn already, or (a coreset) picked among its pool by the teacher's CLS features on
    ``device`` (``teacher`` may be None when ``subset.choice.needs_features`` is false); with several
    ``processes``, every process takes the first process's choice (a coreset's float ties may break differently)."""
    features = None
    if subset.choice.needs_features:
        features = partial(candidate_features, teacher, subset.dataset, transform=eval_transform(teacher),
                           device=device)
    indices, subset.unreadable = subset.choice.choose(features=features)
    if processes > 1:
        from accelerate.utils import broadcast_object_list

        indices = broadcast_object_list([indices])[0]
    subset.indices = indices


@dataclass(frozen=True)
class Steps:
    """How an epoch divides into steps and optimizer updates, and the peak lr of the effective batch."""
    world: int
    peak_lr: float
    per_epoch: int  # each process's batches
    updates_per_epoch: int

    @classmethod
    def of(cls, config: DistillConfig, images: int, world: int) -> Steps:
        per_epoch = math.ceil(images / (config.batch_size * world))
        return cls(world, config.peak_lr(world), per_epoch, math.ceil(per_epoch / config.accum_steps))


@dataclass
class EpochData:
    """Each epoch's batches. The few-shot subset is decoded once into a memory-mapped store (reused by every run
    on this subset), and the paper's augmentation is cut from it on the device, with the teacher's own mean/std.
    View v of image i is reproducible (its crop and flip are drawn from (seed, v, i)) and epoch e shows view
    e mod ``views``, so the teacher's tokens for it can be cached on disk once (``cache``) and reused by every
    later epoch, student and rerun."""
    store: object
    recipe: ViewRecipe
    cache: TeacherCache | None
    views: int
    num_workers: int
    indices: list[int]
    config: DistillConfig
    accelerator: object
    generator: torch.Generator  # reseeded every epoch: the order depends on (seed, epoch) only

    def loader(self, view: int, tokens_from: TeacherCache | None):
        batches = StoreBatches(self.store, self.indices, self.recipe, seed=self.config.seed, view=view,
                               cache=tokens_from)
        loader = store_loader(batches, self.config.batch_size, self.generator, num_workers=self.num_workers,
                              pin_memory=self.accelerator.device.type == "cuda")
        # Sharded across processes; train_one_epoch moves each batch itself, without waiting for the device
        # (accelerate's placement copies synchronously, which would stall the device's queue every step).
        return self.accelerator.prepare_data_loader(loader, device_placement=False)


def open_data(config: DistillConfig, teacher: nn.Module, subset: FewShotSubset, training: Training, accelerator,
              precision: str) -> EpochData:
    """The image store and the teacher cache of a run (see :class:`EpochData`)."""
    recipe = ViewRecipe.for_model(teacher)
    num_workers = loader_workers(config.num_workers)
    cap = CacheCap.resolve(config.cache_max_gb, config.teacher_cache_dir)  # one cap over the store and the cache
    with accelerator.local_main_process_first():  # one process per machine decodes; the others open its store
        store = open_store(subset.dataset, subset.indices, bound=recipe.bound, num_workers=num_workers,
                           progress=accelerator.is_local_main_process,
                           teacher_cache_dir=config.teacher_cache_dir, cap=cap)
    views = config.cache_views or config.epochs
    # Cached where it is read back (an ablate grid, or --cache-teacher on / --teacher-cache DIR), not for a lone run.
    cache = open_for_run(
        config.uses_teacher_cache(), config.teacher_cache_dir, teacher=teacher, dataset=subset.dataset,
        indices=subset.indices, transform=recipe, seed=config.seed, teacher_blocks=training.teacher_blocks,
        norm=training.norm, precision=precision, views=views, cap=cap)
    return EpochData(store, recipe, cache, views, num_workers, subset.indices, config, accelerator,
                     torch.Generator())


@dataclass
class Distillation:
    """Everything a distillation's epochs use, made by :func:`make_distillation`."""
    config: DistillConfig
    run: RunFolder
    accelerator: object
    precision: str
    subset: FewShotSubset
    teacher: nn.Module
    plan: StudentPlan
    steps: Steps
    training: Training  # the student (saved, exported) and its set-up
    data: EpochData
    model: nn.Module  # the prepared (compiled, wrapped) matcher a step calls
    optimizer: torch.optim.Optimizer  # prepared
    scheduler: object
    compiled: bool


def make_distillation(config: DistillConfig, run: RunFolder, subset: FewShotSubset, teacher: nn.Module,
                      plan: StudentPlan, accelerator, precision: str) -> Distillation:
    """The student, what its loss matches, AdamW without decay on 1-D params, warmup from 0 then per-iteration
    cosine to 0 (the set-up bench measures: :func:`wecolora.train.setup.make_training`); then the data, and the
    step's model compiled (by default where Triton runs) and prepared."""
    steps = Steps.of(config, len(subset.indices), accelerator.num_processes)
    training = make_training(teacher, plan, lr=steps.peak_lr, weight_decay=config.weight_decay, epochs=config.epochs,
                             warmup_epochs=config.warmup_epochs, updates_per_epoch=steps.updates_per_epoch,
                             device=accelerator.device, precision=precision, match=config.match,
                             dropout=config.lora_dropout, use_dora=config.dora, use_rslora=config.rslora,
                             width_loss=config.width_loss)
    data = open_data(config, teacher, subset, training, accelerator, precision)
    if plain_attention(accelerator.device, precision):
        use_fused_attention([teacher], False)
    compiled = config.compile if config.compile is not None else compile_by_default(accelerator.device)
    # Static shapes: at most two graphs per run (the full batch and an epoch's shorter last batch).
    matcher = torch.compile(training.matcher, dynamic=False) if compiled else training.matcher
    model, optimizer = accelerator.prepare(matcher, training.optimizer)
    return Distillation(config, run, accelerator, precision, subset, teacher, plan, steps, training, data, model,
                        optimizer, training.scheduler, compiled)


def resume(job: Distillation) -> tuple[int, int, list[dict]]:
    """``(epochs done, updates done, summary rows)``: the checkpoint's with ``--resume``, else a fresh start's."""
    source = job.run.resume_from
    if source is None:
        return 0, 0, []
    progress = load_checkpoint(source, job.training.trained, job.optimizer, job.scheduler)
    _logger.info("resuming from %s after epoch %d", source, progress["epoch"])
    job.scheduler, updates = resume_schedule(job.optimizer, job.scheduler, progress, epochs=job.config.epochs,
                                             lr=job.steps.peak_lr, warmup_epochs=job.config.warmup_epochs,
                                             updates_per_epoch=job.steps.updates_per_epoch)
    return progress["epoch"], updates, progress["rows"]


def write_run_files(job: Distillation) -> None:
    """``config.yaml`` (the settings and what they resolved to), ``subset.json`` (source, rule, keys) and
    ``subset.txt``; logs the run's shape."""
    config, subset, steps, plan = job.config, job.subset, job.steps, job.plan
    job.run.write_config(to_yaml(config, **resolved_settings(job)))
    subset.choice.write(job.run.path)
    _logger.info("%s: %d of %d images, %d blocks kept of %d (%s, keep %s), %s", config.mode, len(subset.indices),
                 len(subset.dataset), len(plan.kept), plan.teacher_blocks, list(plan.kept), plan.keep,
                 get_mode(config.mode).description)
    if plan.narrow:
        w, full, training = plan.student_width, TeacherWidth.of(job.teacher), job.training
        _logger.info("width: %d of %d channels (%d of %d heads), %d of %d MLP neurons (ranking %s); loss on %s",
                     w.embed_dim, full.embed_dim, w.heads, full.heads, w.mlp_hidden, full.mlp_hidden,
                     plan.width_choice.ranking,
                     "the kept channels" if training.channels is not None else
                     "a learned projection to the teacher's width" if training.projector is not None else
                     "every channel (the residual width is the teacher's)")
    effective = config.effective_batch(steps.world)
    _logger.info("effective batch %d = %d x %d accumulation x %d processes; lr %.3g%s", effective, config.batch_size,
                 config.accum_steps, steps.world, steps.peak_lr,
                 "" if config.lr else f" = blr {config.blr:g} x {effective} / 256")


def resolved_settings(job: Distillation) -> dict:
    """What the settings resolved to on this machine, recorded in ``config.yaml`` under ``resolved``."""
    training, data = job.training, job.data
    return {
        **job.plan.record(), "lr": job.steps.peak_lr, "precision": job.precision,
        "device": str(job.accelerator.device), "world_size": job.steps.world,
        "effective_batch": job.config.effective_batch(job.steps.world),
        "matched_student_blocks": training.student_blocks, "matched_teacher_blocks": training.teacher_blocks,
        "images": len(job.subset.indices), "unreadable_images": len(job.subset.unreadable),
        "subset": job.subset.choice.record(), "updates_per_epoch": job.steps.updates_per_epoch, "num_workers": data.num_workers,
        "data_path": "image store, views cut on the device", "image_store": data.store.record(),
        "views": data.views, "teacher_cache": str(data.cache.folder) if data.cache else None,
        "lean_adapters": training.lean_adapters, "compiled": job.compiled, "versions": versions(),
    }


def train_epochs(job: Distillation, start_epoch: int, updates: int, rows: list[dict]) -> list[dict]:
    """Epochs ``start_epoch + 1`` to the last; after each, the first process writes ``summary.csv`` and the
    checkpoint. Returns every epoch's row."""
    from accelerate.utils import set_seed

    config, accelerator, steps = job.config, job.accelerator, job.steps
    bar = tqdm(total=config.epochs * steps.per_epoch, initial=start_epoch * steps.per_epoch, unit="batch",
               disable=not accelerator.is_main_process, desc="distill")
    for epoch in range(start_epoch, config.epochs):
        set_seed(config.seed + epoch)
        job.data.generator.manual_seed(config.seed + epoch)
        metrics, updates = distill_epoch(job, epoch, updates, bar)
        rows.append({"epoch": epoch + 1, **metrics, "updates": updates})
        if accelerator.is_main_process:
            job.run.write_summary(rows, SUMMARY_COLUMNS)
            save_checkpoint(job.run.checkpoint, job.training.trained, job.optimizer, job.scheduler,
                            {"epoch": epoch + 1, "updates": updates, "rows": rows,
                             "updates_per_epoch": steps.updates_per_epoch, "lr": steps.peak_lr})
        accelerator.wait_for_everyone()
    bar.close()
    return rows


def distill_epoch(job: Distillation, epoch: int, updates: int, bar) -> tuple[dict, int]:
    """One epoch on view ``epoch mod views``, whose teacher tokens come from the cache or are computed and stored
    in it; a loss that stops being finite ends the run with one line (where to continue from)."""
    data = job.data
    view, tokens_from, writer = epoch % data.views, None, None
    # A view's tokens are read when every process sees them (a node-local cache dir may hold them on some nodes only).
    if data.cache is not None and all_agree(data.cache.has_view(view)):
        tokens_from = data.cache
    elif data.cache is not None:
        writer = data.cache.writer(view, len(data.indices))
        if job.accelerator.num_processes > 1:  # every process's rows, stored by the first
            writer = SharedWriter(writer, job.accelerator)
    try:
        metrics, updates = train_one_epoch(job.model, job.teacher, data.loader(view, tokens_from), job.optimizer,
                                           job.scheduler, job.accelerator, bar, recipe=data.recipe,
                                           teacher_blocks=job.training.teacher_blocks, norm=job.training.norm,
                                           loss_kind=job.config.loss, updates=updates, epoch=epoch, writer=writer,
                                           channels=job.training.channels)
        if writer is not None and writer.commit():
            _logger.info("teacher cache: view %d of %d stored in %s", view, data.views, data.cache.folder)
    except NonFiniteLoss as err:
        bar.close()
        checkpoint = job.run.checkpoint
        if checkpoint.is_dir():
            advice = (f"the checkpoint after epoch {epoch} is kept in {checkpoint}: continue from it with "
                      f"--resume auto and a lower --blr/--lr, or --precision fp32")
        else:
            advice = "no epoch had finished, so there is no checkpoint: rerun with a lower --blr/--lr, or --precision fp32"
        raise UserError(f"{err}; {advice}") from None
    finally:
        if writer is not None:
            writer.abort()  # no-op once committed; otherwise no half-written view is left behind
    return metrics, updates


def export_student(job: Distillation, rows: list[dict]) -> dict:
    """The merged student and the adapter (first process), the checkpoint removed; returns the run's result."""
    config, plan = job.config, job.plan
    info = {"teacher": config.teacher, "teacher_weights": config.teacher_weights, "keep": config.keep,
            "adapter_targets": list(plan.adapter_targets or ()), "match": config.match, "loss": config.loss}
    if job.accelerator.is_main_process:
        export_run(job.training.student, job.run.path, plan, info)
        job.run.finish()
    job.accelerator.wait_for_everyone()
    return {"output": str(job.run.path), "epochs": rows, "unreadable_images": job.subset.unreadable, **info,
            **plan.record()}


def train_one_epoch(model, teacher, loader, optimizer, scheduler, accelerator, bar, *, recipe, teacher_blocks, norm,
                    loss_kind, updates, epoch, writer=None, channels=None) -> tuple[dict, int]:
    """One pass over the subset; returns ``({loss, lr, images_per_s, seconds}, updates)``.

    Batches are :class:`wecolora.cache.images.StoreBatches` items: each view is cut from the canvas rows here,
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
