"""The training loop: set-up, loop, evaluate, checkpoint. Details are one call away."""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from mmcontrast import faults
from mmcontrast.config import Config
from mmcontrast.data.image import DeviceNormalize, split_device_normalize
from mmcontrast.data.pipeline import check_shard_urls_on_each_node, make_loader
from mmcontrast.losses import Objective
from mmcontrast.model.multimodal import build_model
from mmcontrast.model.pretrained import load_pretrained
from mmcontrast.train.checkpoint import (
    CheckpointWriteError,
    finish_checkpoints,
    full_state_dict,
    load_checkpoint,
    load_data_positions,
    load_weights_file,
    make_universal,
    needs_universal,
    save_checkpoint,
    set_rng_state,
)
from mmcontrast.train.ema import WeightEma
from mmcontrast.train.engine import (
    PRECISION_DTYPES,
    build_engine,
    configure_backends,
    init_distributed,
    scheduled_lr,
)
from mmcontrast.train.grad_cache import grad_cache_step
from mmcontrast.train.guard import BufferSnapshot, NonFiniteCounter
from mmcontrast.train.metrics import MetricsLogger, drop_records_after
from mmcontrast.train.preemption import StopAgreement, StopRequest, clear_marker, write_marker
from mmcontrast.train.resume import check_resume, write_run_config

log = logging.getLogger("mmcontrast.train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: dict, device, float_dtype, normalize_images: DeviceNormalize | None = None) -> dict:
    """Move tensors to the engine's device; floating inputs take the engine's dtype (bf16 runs),
    except the audio waveform, which the mel frontend reads in float32. uint8 images (the
    loader's transform stopped before ToTensor and Normalize) are normalised here, on the device,
    by `normalize_images`. Pinned tensors (the DataLoader pins on a GPU machine) are copied
    without waiting."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            if key == "image" and value.dtype == torch.uint8:
                if normalize_images is None:
                    raise ValueError("the batch holds uint8 images but no normalisation was given for them")
                value = normalize_images(value.to(device, non_blocking=True))
            cast = value.is_floating_point() and key != "audio"
            value = value.to(device, dtype=float_dtype if cast else None, non_blocking=True)
            if value.ndim == 4 and value.is_floating_point():  # images: NHWC convolutions are faster
                value = value.contiguous(memory_format=torch.channels_last)
        elif key == "present":
            value = {m: v.to(device, non_blocking=True) for m, v in value.items()}
        out[key] = value
    return out


def objective_loss(objective, outputs: dict, present: dict, teacher_outputs=None, equal_rows=False):
    """(loss, logged parts) of the model's outputs; the parts include the logit scale.
    equal_rows: every rank's batch has as many samples as this one's (see Objective)."""
    outputs = dict(outputs)
    scale, bias = outputs.pop("logit_scale"), outputs.pop("logit_bias", None)
    if teacher_outputs is not None:
        outputs["teacher"] = teacher_outputs
    loss, parts = objective(outputs, present, scale, bias, equal_rows=equal_rows)
    return loss, {**parts, "logit_scale": scale.detach()}


def train_step(
    engine,
    objective,
    batch: dict,
    micro_batches: int,
    teacher=None,
    loss_hook=None,
):
    """One optimizer step on the batch; several micro-batches go through GradCache.

    loss_hook(loss) -> loss is a test hook. With train.precision amp_bf16 the engine runs its
    forward under bf16 autocast (ds_config's torch_autocast section); the losses and the backward
    run outside it. Returns (loss, parts, applied): applied is
    False when the optimizer found non-finite gradients on some rank and skipped the step (a
    non-finite loss gets there through the chain rule; see guard.py), so no host read happens
    between forward and backward.
    """
    teacher_outputs = teacher(batch) if teacher is not None else None  # eval mode: draws no RNG

    def forward(piece):
        return engine(piece, **objective.forward_kwargs)

    def compute_loss(outputs):
        # training batches are full on every rank (the loader drops partial ones): no size exchange
        loss, parts = objective_loss(objective, outputs, batch["present"], teacher_outputs, equal_rows=True)
        return (loss_hook(loss) if loss_hook is not None else loss), parts

    if micro_batches == 1:
        loss, parts = compute_loss(forward(batch))
        engine.backward(loss)
        engine.step()
        return loss.detach(), parts, engine.was_step_applied()

    def backward(surrogate):
        engine.backward(surrogate, scale_wrt_gas=False)  # a sum over micro-batches, not a mean
        engine.step()  # DeepSpeed steps the optimizer at the last micro-batch only

    loss, parts = grad_cache_step(
        forward,
        compute_loss,
        batch,
        micro_batches,
        backward,
        model=engine.module,
    )
    return loss, parts, engine.was_step_applied()


def nonfinite_reason(loss: torch.Tensor) -> str:
    """What the skipped-step warning says: the gradients, and this rank's loss (NaN when it was
    this rank's loss that made them non-finite)."""
    return f"non-finite gradients (this rank's loss {loss.detach().float().item():.4g})"


def gpu_memory(device: torch.device) -> dict[str, float]:
    """Peak GPU memory of this rank so far (a log-step figure), nothing on CPU."""
    if device.type != "cuda":
        return {}
    return {"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    names = sorted(values)
    stacked = torch.stack([values[n].float().reshape(()) for n in names])
    dist.all_reduce(stacked)
    return {n: v.item() / dist.get_world_size() for n, v in zip(names, stacked, strict=True)}


SKIPPED_KEYS_DIR = "skipped_keys"  # in the run dir: rank<r>.txt, the keys each rank skipped


def skipped_over_ranks(loader, keys_dir: Path | None = None) -> dict:
    """Skipped-sample counts summed over every rank, and with keys_dir the distinct keys the
    ranks wrote there (read by rank 0 only; empty elsewhere). A collective call; it gathers the
    small {reason: count} dicts only, never the keys."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(loader.skipped))
    counts: dict[str, int] = {}
    for part in gathered:
        for reason, n in part.items():
            counts[reason] = counts.get(reason, 0) + n
    keys: set[str] = set()
    if keys_dir is not None and dist.get_rank() == 0:
        for path in sorted(keys_dir.glob("rank*.txt")):
            keys.update(path.read_text().splitlines())
    return {"counts": counts, "keys": sorted(keys)}


def _layout(position: dict) -> tuple[int, int]:
    """(ranks, workers per rank) of a saved data position."""
    return position["world_size"], position["roles"]


def weight_averages(
    engine, objective, cfg: Config, run_dir: Path, state: dict | None
) -> dict[str, WeightEma]:
    """The run's weight EMAs by name: "teacher" (a self-distillation term's, e.g. degla) and
    "ema" (train.ema), restored from a resumed checkpoint's <tag>/<name>.safetensors."""
    averages = {}
    if objective.teacher_decay is not None:
        averages["teacher"] = WeightEma(engine.module, objective.teacher_decay)
    if cfg.train.ema is not None:
        averages["ema"] = WeightEma(engine.module, cfg.train.ema.decay, cfg.train.ema.every)
    for name, average in averages.items() if state else ():
        try:
            average.load_state_dict(load_weights_file(run_dir, state["tag"], name))
        except FileNotFoundError:
            if name != "ema":
                raise
            log.warning(
                "train.ema is new to this run: the average starts from the weights of %s", state["tag"]
            )
    return averages


def evaluate_weights(engine, cfg: Config, benchmarks, ema: WeightEma | None) -> dict:
    """val/... metrics of the trained weights and, with train.ema, val_ema/... of their
    average. Collective."""
    out = {f"val/{k}": v for k, v in evaluate_on_all_ranks(engine, cfg, benchmarks).items()}
    if ema is not None:
        with torch.no_grad():
            for buffer in ema.model.buffers():  # rank 0's statistics, as the checkpoint holds
                dist.broadcast(buffer, src=0)
        evaluation = evaluate_on_all_ranks(engine, cfg, benchmarks, model=ema.model)
        out.update({f"val_ema/{k}": v for k, v in evaluation.items()})
    return out


def evaluation_model(engine, cfg: Config):
    """The model to evaluate: the engine's module, or under ZeRO-3 (whose forward fetches its
    partitions with collectives) an unpartitioned copy on every rank. Collective.

    Buffers such as BatchNorm running statistics move on each rank's own batches; every rank
    takes rank 0's first, the ones the checkpoint and the export hold, so all shares are encoded
    by the same model.
    """
    with torch.no_grad():
        for buffer in engine.module.buffers():
            dist.broadcast(buffer, src=0)
    if engine.zero_optimization_stage() != 3:
        return engine.module
    model = build_model(cfg.model, cfg.modalities)
    model.load_state_dict(full_state_dict(engine, every_rank=True))
    return model.to(engine.device)


def evaluate_on_all_ranks(engine, cfg: Config, benchmarks, model=None) -> dict:
    """Metrics of every benchmark folder (of the engine's model, or `model`); each rank
    encodes its share. Collective."""
    from mmcontrast.eval import Decoder, evaluate_benchmarks
    from mmcontrast.eval.run import caption_fn_for

    model = model if model is not None else evaluation_model(engine, cfg)
    decoder = Decoder(
        model.val_transform,
        cfg.data.audio_sample_rate,
        round(cfg.data.audio_seconds * cfg.data.audio_sample_rate),
        cfg.data.max_image_pixels,
    )
    return evaluate_benchmarks(
        model,
        benchmarks,
        decoder,
        batch_size=cfg.eval.batch_size,
        workers=cfg.data.workers,
        caption_fn=caption_fn_for(model, cfg.eval.caption_strategy),
    )


def train(cfg: Config, resume: bool | str = False) -> dict:
    """Train a run. resume: False, True (the latest checkpoint must exist) or "if_exists"."""
    # ---- set-up
    rank, world, _ = init_distributed(cfg.train.dist_timeout_minutes)
    configure_backends(cfg.train.tf32)
    stop = StopRequest()
    try:
        return _train(cfg, resume, rank, world, stop)
    except BaseException:
        try:  # a checkpoint saved in the background a few steps ago can still become `latest`
            finish_checkpoints(timeout=60)
        except CheckpointWriteError:
            pass  # already logged; the error that ended the run is the one to raise
        raise
    finally:
        stop.close()


def check_inputs(cfg: Config) -> list:
    """Refuse a run whose inputs cannot be read, before any work: the one place for such checks.
    Returns the eval benchmarks, read.

    One rank per node checks the shards; every rank learns the outcome (collective).
    """
    from mmcontrast.eval import read_benchmark

    check_shard_urls_on_each_node(cfg.data.train, "data.train")
    return [read_benchmark(b) for b in cfg.eval.benchmarks]  # layout, shards, class names, templates


def _train(cfg: Config, resume: bool | str, rank: int, world: int, stop: StopRequest) -> dict:
    benchmarks = check_inputs(cfg)  # a missing shard or a broken benchmark fails now, before the model
    # a resume that cannot continue this run is refused before any file of the run changes
    resume_tag = check_resume(cfg, world, "required" if resume is True else resume or "")
    run_dir = Path(cfg.run.dir)
    universal = resume_tag is not None and needs_universal(run_dir, resume_tag, world)
    if universal:  # another number of ranks: reshard the partitioned optimizer state first
        make_universal(run_dir, resume_tag)
    if rank == 0:
        clear_marker(run_dir)  # only a stop during this run may leave it
        write_run_config(cfg, resume_tag)
        if resume_tag is None:  # a fresh start's skipped keys start empty (build_engine syncs the ranks)
            shutil.rmtree(run_dir / SKIPPED_KEYS_DIR, ignore_errors=True)
    seed_everything(cfg.run.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, cfg.modalities)
    if resume_tag is None:  # a resume continues from its checkpoint's weights
        load_pretrained(model, cfg.model)
    if cfg.train.activation_checkpointing:
        model.set_grad_checkpointing(True)
    objective = Objective.from_config(cfg.loss, cfg.modalities)
    engine = build_engine(model, cfg, load_universal=universal)
    float_dtype = PRECISION_DTYPES[cfg.train.precision]

    state = None
    if resume_tag is not None:
        state = load_checkpoint(engine, run_dir, resume_tag, universal=universal)
        log.info("resumed from %s at step %d", resume_tag, state["step"])
    if rank == 0 and resume:  # records logged after that checkpoint (or any, without one) were lost
        resumed_at = state["step"] if state else 0
        drop_records_after(run_dir, resumed_at, evaluations_at_step=resumed_at >= cfg.train.steps)
    step = state["step"] if state else 0
    averages = weight_averages(engine, objective, cfg, run_dir, state)
    teacher, ema = averages.get("teacher"), averages.get("ema")
    seed_everything(cfg.run.seed + 1000 * rank)  # distinct dropout per rank
    saved_layout = None  # every rank's data position, when the checkpoint's ranks or workers differ
    if state and ("data" not in state or _layout(state["data"]) != (world, max(1, cfg.data.workers))):
        saved_layout = load_data_positions(run_dir, state["tag"])
        if rank == 0:
            log.warning(
                "resuming on %d rank(s) x %d data worker(s) a checkpoint written by %d x %d: the rest of "
                "epoch %d is read once, in another order than an uninterrupted run's",
                world,
                max(1, cfg.data.workers),
                *_layout(saved_layout[0]),
                saved_layout[0]["epoch"],
            )

    # workers hand over uint8 images; the float conversion and normalisation run on the device
    image_transform, normalize_images = split_device_normalize(model.train_transform)
    loader = make_loader(
        cfg.data.train,
        cfg.data,
        image_transform=image_transform,
        tokenizer=model.tokenizer,
        train=True,
        seed=cfg.run.seed,
        rank=rank,
        world_size=world,
        weights=cfg.data.train_weights or None,
        position=state["data"] if state and not saved_layout else None,
        index_dir=cfg.data.index_dir or str(run_dir / "shard_index"),
    )
    if saved_layout:
        loader.continue_layout(saved_layout)
    loader.write_skipped_keys_to(run_dir / SKIPPED_KEYS_DIR / f"rank{rank}.txt")
    batches = iter(loader)
    if state and not saved_layout:
        set_rng_state(state["rng"])
    elif state:  # another layout: this rank's generators did not exist; seed them for this step
        seed_everything(cfg.run.seed + 1000 * rank + 100_003 * step)
    metrics = MetricsLogger(run_dir, cfg, enabled=rank == 0)
    bar = tqdm(
        total=cfg.train.steps,
        initial=step,
        disable=rank != 0 or not cfg.train.progress,
        unit="step",
        dynamic_ncols=True,
    )
    samples_seen, clock = 0, time.time()
    nonfinite = NonFiniteCounter(cfg.train.max_nonfinite_steps, last_checkpoint=step)
    if state and "nonfinite" in state:
        nonfinite.load_state_dict(state["nonfinite"])
    fault = faults.InjectedFault.from_env(rank)  # test hooks, inactive without their variables
    buffers = BufferSnapshot(engine.module)
    agreement = StopAgreement(stop, engine.device)  # a stop signal on any rank, one step later

    # ---- loop
    while step < cfg.train.steps:
        batch = to_device(next(batches), engine.device, float_dtype, normalize_images)
        buffers.save()
        faults.set_step(step + 1)
        faults.record_keys(batch)
        loss, parts, applied = train_step(
            engine,
            objective,
            batch,
            cfg.train.accumulation,
            teacher,
            loss_hook=lambda loss, s=step + 1: fault(loss, s),
        )
        step += 1
        if not applied:
            buffers.restore()
        reason = "" if applied else nonfinite_reason(loss)  # a host read on skipped steps only
        nonfinite.record(step, applied, batch["__key__"], reason)
        if applied:
            for average in averages.values():
                average.update(engine.module, step)
        faults.kill_point("step")
        samples_seen += len(batch["__key__"])
        bar.update(1)

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            values = mean_over_ranks({"loss": loss.detach(), **parts})
            rate = samples_seen * world / (time.time() - clock)
            samples_seen, clock = 0, time.time()
            skipped = skipped_over_ranks(loader)["counts"]  # a log step: counts only
            bar.set_postfix(loss=f"{values['loss']:.3f}", samples_s=f"{rate:.0f}")
            metrics.log(
                {
                    "step": step,
                    **values,
                    "lr": scheduled_lr(engine),
                    "samples_per_s": rate,
                    "nonfinite_steps": nonfinite.total,
                    **gpu_memory(engine.device),
                    **{f"skipped/{k}": v for k, v in skipped.items()},
                }
            )

        if (
            cfg.train.eval_every
            and step % cfg.train.eval_every == 0
            and step < cfg.train.steps
            and benchmarks
        ):
            metrics.log({"step": step, **evaluate_weights(engine, cfg, benchmarks, ema)})

        due = cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0
        stopping = agreement.poll()  # SIGUSR1/SIGTERM/SIGINT on any rank: checkpoint now and leave
        if due or stopping or step == cfg.train.steps:
            save_checkpoint(
                engine,
                run_dir,
                step,
                {"data": loader.state_dict(), "nonfinite": nonfinite.state_dict()},
                cfg.train.keep_checkpoints,
                weights_files={name: average.state_dict() for name, average in averages.items()},
                full_weights=step == cfg.train.steps
                or bool(cfg.train.weights_every and step % cfg.train.weights_every == 0),
                # checksums and `latest` beside the next steps; the last save of a run finishes here
                background=not stopping and step < cfg.train.steps,
            )
            nonfinite.last_checkpoint = step
        if stopping and step < cfg.train.steps:
            agreement.close()
            if rank == 0:
                write_marker(run_dir, step, stop.signal)
                log.warning("stopped at step %d with a checkpoint; --resume continues from it", step)
            bar.close()
            metrics.close()
            dist.barrier()
            return {"step": step, "stopped": True}

    # ---- evaluate and finish
    agreement.close()
    bar.close()
    dist.barrier()  # every rank's keys are in its file
    skipped = skipped_over_ranks(loader, run_dir / SKIPPED_KEYS_DIR)
    result = {"step": step, "skipped": skipped}
    if rank == 0:
        (run_dir / "skipped.json").write_text(json.dumps(skipped, indent=2))
        if skipped["counts"]:
            log.warning("skipped samples: %s", skipped["counts"])
    if benchmarks:
        final = evaluate_weights(engine, cfg, benchmarks, ema)
        metrics.log({"step": step, **final})
        if rank == 0:  # every rank holds it; one prints it
            result["eval"] = {k.removeprefix("val/"): v for k, v in final.items() if k.startswith("val/")}
            if ema is not None:
                result["eval_ema"] = {
                    k.removeprefix("val_ema/"): v for k, v in final.items() if k.startswith("val_ema/")
                }
    metrics.close()
    dist.barrier()
    return result
