"""The DeepSpeed JSON of a run: generated from the typed train config, plus a user's own file.

DeepSpeed ignores keys it does not know at the top level (EVA-CLIP's stage-3 keys sat there and
did nothing), so a user's file is checked before any work: ZeRO keys must sit under
`zero_optimization`, and a key the run config also sets must agree with it.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmcontrast.config import ConfigError

# Dynamic loss scaling (loss_scale 0), DeepSpeed's documented defaults; fp16 is GPU-only.
FP16_DYNAMIC = {
    "enabled": True,
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}

# Keys the run config owns, and where a user sets them instead.
OWNED = {
    "train_micro_batch_size_per_gpu": "data.batch_size / train.accumulation",
    "gradient_accumulation_steps": "train.accumulation",
    "train_batch_size": "data.batch_size x ranks",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "torch_autocast.enabled": "train.precision (amp_bf16)",
    "torch_autocast.dtype": "train.precision (amp_bf16)",
    "torch_autocast.lower_precision_safe_modules": "train.precision (amp_bf16 reduces every gradient in fp32)",
    "zero_allow_untested_optimizer": "nothing: mmcontrast's torch AdamW needs it true",
}
REFUSED = {
    "optimizer": "the run config owns the optimizer (train.lr, betas, eps, weight_decay)",
    "scheduler": "the run config owns the schedule (train.warmup, steps, min_lr)",
}


def generated_config(train_cfg, batch_size: int, world_size: int | None = None) -> dict:
    """The DeepSpeed JSON the run config implies. batch_size: samples per rank per step;
    train.accumulation micro-batches of batch_size / accumulation make one step."""
    config = {
        "train_micro_batch_size_per_gpu": batch_size // train_cfg.accumulation,
        "gradient_accumulation_steps": train_cfg.accumulation,
        "gradient_clipping": train_cfg.grad_clip,
        "zero_optimization": {"stage": train_cfg.zero_stage},
        "bf16": {"enabled": train_cfg.precision == "bf16"},
        "fp16": dict(FP16_DYNAMIC) if train_cfg.precision == "fp16" else {"enabled": False},
        # A torch optimizer avoids building DeepSpeed's fused CPU Adam (a ~75 s JIT compile).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train_cfg.precision == "bf16":
        # bf16 weights, but gradients summed over ranks in fp32: a bf16 all-reduce over many
        # ranks loses the low bits of every gradient (a user's file may say otherwise)
        config["communication_data_type"] = "fp32"
    if train_cfg.precision == "amp_bf16":
        # DeepSpeed's forward switches off an autocast entered outside it unless this section
        # enables its own. No module is listed as safe for bf16 communication: the gradients of
        # fp32 weights are reduced in fp32, as open_clip's DDP does under amp_bf16.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    if world_size is not None:
        config["train_batch_size"] = batch_size * world_size
    return config


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def read_user_config(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"train.deepspeed: no such file {path!r}")
    try:
        user = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"train.deepspeed: {path} is not valid JSON ({exc})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"train.deepspeed: {path} must hold a JSON object of DeepSpeed keys")
    return user


def _zero_keys() -> set[str]:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    keys = set()
    for name, field in DeepSpeedZeroConfig.model_fields.items():
        keys.add(name)
        if field.alias:
            keys.add(field.alias)
    return keys


def check_user_config(user: dict, generated: dict, source: str) -> None:
    """Refuse misplaced ZeRO keys, run-owned keys with another value, and optimizer/scheduler."""
    problems = []
    for key, why in REFUSED.items():
        if key in user:
            problems.append(f"'{key}' is not accepted: {why}")
    misplaced = sorted(set(user) & _zero_keys())
    for key in misplaced:
        problems.append(f"'{key}' belongs under 'zero_optimization' (DeepSpeed ignores it at the top level)")
    theirs, ours = _flatten(user), _flatten(generated)
    for path, where in OWNED.items():
        if path in theirs and path in ours and theirs[path] != ours[path]:
            problems.append(
                f"'{path}' is {json.dumps(theirs[path])} there but the run config gives "
                f"{json.dumps(ours[path])} (from {where}); set it in one place"
            )
    if problems:
        raise ConfigError(
            f"train.deepspeed: {source} conflicts with the run config:\n  " + "\n  ".join(problems)
        )


def parse_with_deepspeed(config: dict, source: str) -> None:
    """DeepSpeed's own parser: nested keys are checked strictly (unknown ones are errors)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(json.loads(json.dumps(config)))
    except Exception as exc:  # pydantic ValidationError, AssertionError, ValueError ...
        raise ConfigError(f"train.deepspeed: DeepSpeed rejects {source}: {exc}") from None


def deepspeed_config(cfg, world_size: int | None = None) -> dict:
    """The run's DeepSpeed JSON: the generated one, merged with train.deepspeed's file if any."""
    generated = generated_config(cfg.train, cfg.data.batch_size, world_size)
    if not cfg.train.deepspeed:
        return generated
    user = read_user_config(cfg.train.deepspeed)
    check_user_config(user, generated, cfg.train.deepspeed)
    merged = _merge(generated, user)
    parse_with_deepspeed(merged, cfg.train.deepspeed)
    return merged
