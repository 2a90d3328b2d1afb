"""DeepSpeed engine set-up: process group, parameter groups, schedule, generated DS config."""

from __future__ import annotations

import datetime
import math
import os
import socket

import torch

from mmcontrast.config import ConfigError
from mmcontrast.train.ds_config import deepspeed_config
from mmcontrast.train.guard import FiniteGuardedAdamW


def init_distributed(timeout_minutes: float = 30.0) -> tuple[int, int, int]:
    """Start (or join) the process group; a plain `python` run becomes a world of one.

    Returns (rank, world_size, local_rank). CPU runs use gloo, GPU runs nccl; a collective that
    waits longer than timeout_minutes fails the job.
    """
    import deepspeed

    if "RANK" not in os.environ:  # not under torchrun / deepspeed / srun: single process
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def offloaded_optimizer_threads(ds_config: dict) -> int | None:
    """Threads for a rank whose optimizer steps on the CPU (ZeRO offload_optimizer), None when
    it does not: the rank's share of the CPUs it may use. torchrun starts every rank with
    OMP_NUM_THREADS=1, which would leave the whole AdamW step of the model on one core."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    if offload.get("device") != "cpu":
        return None
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, len(os.sched_getaffinity(0)) // ranks_here)


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    lr: float,
    lr_scale: dict[str, float] | None = None,
    layer_decay: dict[str, float] | None = None,
) -> list[dict]:
    """AdamW groups as CLIP: no decay on norms, biases, gains and the logit scale. Locked
    (requires_grad=False) parameters are left out, so they get no optimizer state.

    Each group's learning rate is lr x its tower's lr_scale x layer_decay ** (layers above it
    in its tower); the group keeps the product as "lr_scale" and the schedule multiplies its lr.
    """
    from mmcontrast.model.tower_groups import layer_groups

    lr_scale, layer_decay = lr_scale or {}, layer_decay or {}
    layers = layer_groups(model)
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "bn" in name or "ln" in name or "norm" in name or "bias" in name
        decays = not (exempt or "logit_scale" in name)
        tower, layer, top = layers[name]
        scale = lr_scale.get(tower, 1.0) * layer_decay.get(tower, 1.0) ** (top - layer)
        groups.setdefault((scale, decays), []).append(p)
    # scale 1 first, undecayed before decayed: the order (and checkpoints) of a run without scales
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decays else 0.0,
            "lr": lr * scale,
            "lr_scale": scale,
        }
        for (scale, decays), params in sorted(groups.items(), key=lambda item: (-item[0][0], item[0][1]))
    ]


def scheduled_lr(engine) -> float:
    """The schedule's learning rate now (train.lr x the schedule), before per-group scales."""
    group = engine.optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier: linear warmup to 1, then cosine to min_ratio at `total` steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# The dtype of the weights and of the floating inputs; amp_bf16 keeps both in float32.
PRECISION_DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "amp_bf16": torch.float32,
    "fp16": torch.float16,
}


def configure_backends(tf32: bool) -> None:
    """TF32 matmuls and convolutions and cuDNN autotuning on a GPU; nothing on CPU."""
    if not torch.cuda.is_available():
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True


def build_engine(model: torch.nn.Module, cfg, load_universal: bool = False):
    """Wrap the model in a DeepSpeed engine with AdamW and a warmup + cosine schedule.
    load_universal: the checkpoint to load is a universal one (train/checkpoint.py)."""
    import deepspeed

    t = cfg.train
    if t.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "train.precision: fp16 needs a GPU (DeepSpeed's dynamic loss scaling); use bf16 or fp32 on CPU"
        )
    # DeepSpeed's bf16 and ZeRO optimizers skip a step with non-finite gradients; fp32 weights at
    # stage 0 step this one directly, which must then skip it itself (train/guard.py)
    guarded = t.zero_stage == 0 and t.precision in ("fp32", "amp_bf16")
    # fused: one kernel over all parameters, on CPU too (2.5x faster than the per-tensor loop
    # open_clip's default takes there)
    options = {"lr": t.lr, "betas": tuple(t.betas), "eps": t.eps, "fused": True}
    if guarded:
        optimizer = FiniteGuardedAdamW(
            param_groups(model, t.weight_decay, t.lr, t.lr_scale, t.layer_decay),
            max_grad_norm=t.grad_clip,
            **options,
        )
    else:
        optimizer = torch.optim.AdamW(
            param_groups(model, t.weight_decay, t.lr, t.lr_scale, t.layer_decay), **options
        )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(t.warmup, t.steps, t.min_lr / t.lr))
    config = deepspeed_config(cfg, world_size=torch.distributed.get_world_size())
    if guarded:  # the guarded optimizer clips with the norms it computes anyway; DeepSpeed's
        # clipping would compute them again, one tensor at a time
        config["gradient_clipping"] = 0.0
    threads = offloaded_optimizer_threads(config)
    if threads is not None and threads > torch.get_num_threads():
        torch.set_num_threads(threads)  # torch's fused CPU AdamW runs its step on these
    if load_universal:
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=config
    )
    if t.zero_stage == 0 and engine.dp_world_size == 1:
        # averaging over one rank changes nothing, but DeepSpeed would still flatten every
        # gradient into a buffer and copy it back (8% of a demo-model step on CPU)
        engine.enable_backward_allreduce = False
    dtype = PRECISION_DTYPES[t.precision]
    if dtype != torch.float32:
        # DeepSpeed casts parameters, not buffers; torch's batch_norm wants its running
        # statistics in the dtype of its weights.
        for module in engine.module.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                module.running_mean.data = module.running_mean.data.to(dtype)
                module.running_var.data = module.running_var.data.to(dtype)
    if t.compile:
        model.compile_towers()
    if t.zero_stage == 3 and getattr(model, "is_coca", False):
        # The caption loss reads the decoder's output projection outside the decoder's own
        # forward (losses.caption chunks it): ZeRO-3 must gather it for the whole model forward.
        deepspeed.zero.register_external_parameter(model, model.clip.text_decoder.text_projection)
    return engine
