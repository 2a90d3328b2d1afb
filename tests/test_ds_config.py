"""The generated DeepSpeed JSON, read back by DeepSpeed's own parser; user files and conflicts."""

from __future__ import annotations

import json

import pytest
import torch
from deepspeed.runtime.config import DeepSpeedConfig

from mmcontrast.config import ConfigError, load_config
from mmcontrast.train.ds_config import deepspeed_config, generated_config


def _cfg(repo_root, *overrides):
    return load_config(repo_root / "configs/demo.yaml", list(overrides))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_generated_config_lands_where_deepspeed_reads_it(repo_root, stage, precision):
    cfg = _cfg(
        repo_root,
        f"train.zero_stage={stage}",
        f"train.precision={precision}",
        "train.grad_clip=0.5",
        "data.batch_size=32",
        "train.accumulation=4",
    )
    parsed = DeepSpeedConfig(deepspeed_config(cfg, world_size=1))  # no process group: 1 rank
    assert parsed.zero_optimization_stage == stage
    assert parsed.bfloat16_config.enabled == (precision == "bf16")
    assert parsed.float16_config.enabled == (precision == "fp16")
    if precision == "fp16":
        assert parsed.float16_config.loss_scale == 0  # dynamic loss scaling
        assert parsed.float16_config.initial_scale_power == 16
    assert parsed.gradient_clipping == 0.5
    assert parsed.train_micro_batch_size_per_gpu == 8
    assert parsed.gradient_accumulation_steps == 4
    assert parsed.train_batch_size == 32  # samples per rank per step x 1 rank


@pytest.mark.parametrize("preset", ["zero1", "zero2", "zero3", "zero3-offload"])
def test_presets_merge_and_their_keys_reach_the_zero_config(repo_root, preset):
    path = repo_root / "configs" / "deepspeed" / f"{preset}.json"
    user = json.loads(path.read_text())
    stage = user["zero_optimization"]["stage"]
    cfg = _cfg(repo_root, f"train.zero_stage={stage}", f"train.deepspeed={path}")
    parsed = DeepSpeedConfig(deepspeed_config(cfg, world_size=1))  # no process group: 1 rank
    zero = parsed.zero_config
    assert zero.stage == stage
    for key, value in user["zero_optimization"].items():
        field = {"stage3_prefetch_bucket_size": "prefetch_bucket_size"}.get(key, key.removeprefix("stage3_"))
        got = getattr(zero, field)
        if isinstance(value, dict):  # offload sections
            assert got.device == value["device"]
        else:
            assert got == value, key


def test_a_preset_for_another_stage_is_refused(repo_root):
    path = repo_root / "configs/deepspeed/zero3.json"
    with pytest.raises(ConfigError, match=r"'zero_optimization.stage' is 3 there .* train.zero_stage"):
        _cfg(repo_root, "train.zero_stage=2", f"train.deepspeed={path}")


def _user_file(tmp_path, content) -> str:
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"bf16": {"enabled": True}}, r"'bf16.enabled' is true there .* train.precision"),
        ({"gradient_clipping": 2.0}, r"'gradient_clipping' is 2.0 there .* train.grad_clip"),
        ({"gradient_accumulation_steps": 8}, r"train.accumulation"),
        ({"train_micro_batch_size_per_gpu": 3}, r"data.batch_size / train.accumulation"),
        ({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}, r"'optimizer' is not accepted"),
        ({"scheduler": {"type": "WarmupLR"}}, r"'scheduler' is not accepted"),
        # EVA-CLIP's mistake: DeepSpeed ignores ZeRO keys at the top level
        (
            {"stage3_max_live_parameters": 10**9},
            r"'stage3_max_live_parameters' belongs under 'zero_optimization'",
        ),
        ({"offload_optimizer": {"device": "cpu"}}, r"belongs under 'zero_optimization'"),
        ({"zero_optimization": {"stage": 0, "stage3_max_live_params": 1}}, r"DeepSpeed rejects"),
        ("{not json", r"not valid JSON"),
        ("[1, 2]", r"must hold a JSON object"),
    ],
)
def test_user_json_conflicts_are_refused_before_any_work(repo_root, tmp_path, content, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(repo_root, f"train.deepspeed={_user_file(tmp_path, content)}")


def test_user_json_may_repeat_owned_keys_with_the_same_value_and_add_its_own(repo_root, tmp_path):
    user = {
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 1234},
        "communication_data_type": "fp32",
    }
    cfg = _cfg(
        repo_root,
        "train.precision=bf16",
        "train.zero_stage=2",
        f"train.deepspeed={_user_file(tmp_path, user)}",
    )
    merged = deepspeed_config(cfg, world_size=1)
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1234}
    assert merged["communication_data_type"] == "fp32"
    assert merged["zero_allow_untested_optimizer"] is True  # the generated keys stay


def test_missing_user_file_is_named(repo_root):
    with pytest.raises(ConfigError, match="train.deepspeed: no such file"):
        _cfg(repo_root, "train.deepspeed=/nonexistent/ds.json")


def test_accumulation_must_divide_the_batch(repo_root):
    with pytest.raises(ConfigError, match="train.accumulation"):
        _cfg(repo_root, "data.batch_size=30", "train.accumulation=4")
    assert (
        generated_config(_cfg(repo_root, "data.batch_size=32", "train.accumulation=4").train, 32)[
            "train_micro_batch_size_per_gpu"
        ]
        == 8
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU-only machines")
def test_fp16_is_refused_on_cpu_with_a_sentence(repo_root):
    from mmcontrast.train.engine import build_engine

    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        build_engine(torch.nn.Linear(2, 2), _cfg(repo_root, "train.precision=fp16"))


def test_activation_checkpointing_reaches_open_clip_and_timm_towers(repo_root):
    from mmcontrast.model.multimodal import build_model

    cfg = _cfg(
        repo_root,
        "model.clip={embed_dim: 16, vision_cfg: {image_size: 32, layers: 1, width: 16, head_width: 8, patch_size: 16},"
        " text_cfg: {context_length: 8, vocab_size: 49408, width: 16, heads: 2, layers: 1}}",
    )
    model = build_model(cfg.model, cfg.modalities)
    model.set_grad_checkpointing(True)
    assert model.clip.visual.transformer.grad_checkpointing
    assert model.clip.transformer.grad_checkpointing
    assert model.towers["audio"].backbone.grad_checkpointing


@pytest.mark.parametrize(
    ("preset", "ranks_here"), [("zero3", "1"), ("zero3-offload", "1"), ("zero3-offload", "4")]
)
def test_an_offloaded_optimizer_gets_the_ranks_share_of_the_cpus(repo_root, monkeypatch, preset, ranks_here):
    """torchrun starts ranks with OMP_NUM_THREADS=1: the CPU AdamW step of ZeRO offload would run
    on one core, so the engine raises the thread count to the rank's share."""
    from mmcontrast.train.engine import offloaded_optimizer_threads

    path = repo_root / "configs" / "deepspeed" / f"{preset}.json"
    cfg = _cfg(repo_root, "train.zero_stage=3", f"train.deepspeed={path}")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks_here)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    threads = offloaded_optimizer_threads(deepspeed_config(cfg, world_size=1))
    assert threads == (None if preset == "zero3" else 8 // int(ranks_here))
