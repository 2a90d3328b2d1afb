import subprocess
import sys

import pytest

from mmcontrast.config import ConfigError, load_config


def test_demo_config_loads_with_overrides(repo_root):
    cfg = load_config(
        repo_root / "configs/demo.yaml", ["train.steps=7", "run.dir=/tmp/x", "eval.benchmarks=[b/x]"]
    )
    assert cfg.train.steps == 7 and cfg.run.dir == "/tmp/x" and cfg.eval.benchmarks == ["b/x"]
    assert cfg.modalities == ["image", "text", "audio"]
    assert cfg.data.train.startswith("demo_out/world/train-")
    # YAML 1.1 reads 3e-4 as a string: numbers in exponent form still work
    assert load_config(repo_root / "configs/demo.yaml", ["train.lr=3e-4"]).train.lr == 3e-4
    augment = load_config(repo_root / "configs/demo.yaml", ["model.image_augment={scale: [1.0, 1.0]}"])
    assert augment.model.image_augment == {"scale": [1.0, 1.0]}


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.stpes=5", "train.stpes"),  # misspelt key
        ("trian.steps=5", "trian"),
        ("train.steps=0", "train.steps"),  # out of range
        ("train.steps=many", "train.steps"),  # wrong type
        ("train.lr=1e-3x", "train.lr"),
        ("eval.caption_strategy=sample", "eval.caption_strategy"),
        ("model.image_augment={scael: [1, 1]}", "model.image_augment.scael"),
        ("train.precision=fp8", "train.precision"),
        ("run.wandb=maybe", "run.wandb"),
        ("data.fields.smell=x", "data.fields.smell"),
        ("loss.terms=[{name: nope}]", "loss.terms[0].name"),
        ("loss.terms=[{name: info_nce, pairs: [[image, image]]}]", "loss.terms[0].pairs"),
        ("loss.terms=[{name: symile, options: {negatives: nn}}]", "loss.terms[0].options.negatives"),
        ("loss.terms=[{name: gram, options: {anchor: smell}}]", "loss.terms[0].options.anchor"),
        ("loss.terms=[{name: siglip}]", "model.init_logit_bias"),
    ],
)
def test_bad_keys_and_values_name_the_key(repo_root, override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(repo_root / "configs/demo.yaml", [override])
    assert needle in str(err.value)


def test_misspelt_key_suggests_the_right_one(repo_root):
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_config(repo_root / "configs/demo.yaml", ["train.stepz=5"])


def test_yaml_file_with_bad_key_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 5\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(bad)


@pytest.mark.parametrize("override,needle", [("train.stpes=5", "train.stpes"), ("train.lr=-1", "train.lr")])
def test_cli_train_refuses_before_any_work(repo_root, tmp_path, override, needle):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmcontrast.cli",
            "train",
            str(repo_root / "configs/demo.yaml"),
            override,
            f"run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert not run_dir.exists()  # nothing was started


def test_base_config_is_merged_and_overridden(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  steps: 5\n  lr: 0.01\nrun:\n  dir: x\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  steps: 7\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.train.steps, cfg.train.lr, cfg.run.dir) == (7, 0.01, "x")


@pytest.mark.parametrize(
    "text,needle", [("base: missing.yaml\n", "no such file"), ("base: c.yaml\n", "loops")]
)
def test_broken_base_is_refused(tmp_path, text, needle):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(tmp_path / "c.yaml")


def test_demo_variants_load(repo_root):
    for name in ("demo-gram.yaml", "demo-symile.yaml", "demo-coca.yaml"):
        cfg = load_config(repo_root / "configs" / name)
        assert cfg.data.batch_size == load_config(repo_root / "configs/demo.yaml").data.batch_size


def test_image_augment_reaches_the_training_transform(repo_root):
    from torchvision.transforms import RandomResizedCrop

    from mmcontrast.model.multimodal import build_model

    cfg = load_config(repo_root / "configs/demo.yaml", ["model.image_augment={scale: [0.5, 0.6]}"])
    crops = [
        t
        for t in build_model(cfg.model, cfg.modalities).train_transform.transforms
        if isinstance(t, RandomResizedCrop)
    ]
    assert len(crops) == 1 and tuple(crops[0].scale) == (0.5, 0.6)
