"""Starting from pretrained towers: weights from open_clip files and exports, locking (LiT),
per-tower learning rates and layer decay, patch dropout. open_clip's own loader is the reference."""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from mmcontrast.config import ConfigError, load_config
from mmcontrast.export import export_run
from mmcontrast.model.multimodal import build_model
from mmcontrast.model.pretrained import PretrainedError, load_pretrained
from mmcontrast.model.tower_groups import layer_groups
from mmcontrast.train.engine import param_groups, warmup_cosine
from tests.export_helpers import DEMO_CONFIG, make_run_dir

VIT = (
    "model.clip={embed_dim: 32, vision_cfg: {image_size: 32, layers: 3, width: 32, head_width: 16, patch_size: 8},"
    " text_cfg: {context_length: 16, vocab_size: 49408, width: 32, heads: 2, layers: 2}}"
)


def _config(*overrides):
    return load_config(DEMO_CONFIG, ["model.audio.n_mels=32", *overrides])


def _batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return {
        "image": torch.randn(4, 3, size, size, generator=g),
        "text": model.tokenizer(["a red circle", "a blue star", "two green squares", "a sound"]),
        "audio": torch.randn(4, 16000, generator=g) * 0.3,
    }


def _fresh(cfg, seed):
    torch.manual_seed(seed)
    return build_model(cfg.model, cfg.modalities).eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained-looking demo model exported by mmcontrast: the folder and the model."""
    root = tmp_path_factory.mktemp("pretrained")
    _, models = make_run_dir(root / "run", steps=(100,), seed=7, overrides=["model.audio.n_mels=32"])
    return export_run(root / "run", root / "export"), models["step_0000100"]


@torch.no_grad()
def _same_as_open_clip(model, reference, batch, modalities) -> None:
    """The model's embeddings equal those of open_clip's own model (atol 1e-6)."""
    encoders = {"image": reference.encode_image, "text": reference.encode_text}
    for m in modalities:
        torch.testing.assert_close(
            model.encode(m, batch[m]), encoders[m](batch[m], normalize=True), atol=1e-6, rtol=0
        )


def test_open_clip_train_checkpoint_gives_the_embeddings_open_clip_loads(tmp_path):
    """A .pt as open_clip_train writes it (DDP's module. prefix under state_dict, scalar
    logit_scale): the run's model encodes as open_clip's own loader of that file does."""
    cfg = _config(VIT, "data.fields={image: png, text: txt}")
    source = _fresh(cfg, seed=3)
    state = {f"module.{k}": v for k, v in source.open_clip_state_dict().items()}
    checkpoint = tmp_path / "epoch_5.pt"
    torch.save({"epoch": 5, "name": "run", "state_dict": state, "optimizer": {}}, checkpoint)

    cfg = _config(VIT, "data.fields={image: png, text: txt}", f"model.pretrained={checkpoint}")
    started = _fresh(cfg, seed=99)
    before = started.clip.visual.conv1.weight.detach().clone()
    load_pretrained(started, cfg.model)
    assert not torch.equal(before, started.clip.visual.conv1.weight)  # seeds 3 and 99 differ

    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": source.clip_cfg, "preprocess_cfg": {}})
    )
    reference = open_clip.create_model(f"local-dir:{folder}")
    open_clip.load_checkpoint(reference, str(checkpoint))  # open_clip's own reading of the file
    reference.eval()
    batch = _batch(started)
    _same_as_open_clip(started, reference, batch, ("image", "text"))
    assert started.logit_scale().item() == pytest.approx(
        math.exp(min(source.clip.logit_scale.item(), math.log(100)))
    )


def test_an_export_starts_every_tower_where_the_source_was(source):
    folder, model = source
    cfg = _config(f"model.pretrained={folder}", f"model.audio.pretrained={folder}")
    started = _fresh(cfg, seed=123)
    load_pretrained(started, cfg.model)
    batch = _batch(started)
    reference = open_clip.create_model(f"local-dir:{folder}").eval()  # open_clip reads the folder itself
    with torch.no_grad():
        for modality in ("image", "text", "audio"):
            close = torch.testing.assert_close
            close(
                started.encode(modality, batch[modality]),
                model.encode(modality, batch[modality]),
                atol=1e-6,
                rtol=0,
            )
    _same_as_open_clip(started, reference, batch, ("image",))


def test_model_clip_local_dir_loads_its_weights_or_is_refused(source, tmp_path):
    folder, model = source
    cfg = _config(f"model.clip=local-dir:{folder}")
    started = _fresh(cfg, seed=5)
    load_pretrained(started, cfg.model)
    batch = _batch(started)
    with torch.no_grad():
        assert torch.equal(started.encode("image", batch["image"]), model.encode("image", batch["image"]))
    bare = tmp_path / "architecture-only"
    bare.mkdir()
    (bare / "open_clip_config.json").write_text((folder / "open_clip_config.json").read_text())
    cfg = _config(f"model.clip=local-dir:{bare}")
    with pytest.raises(PretrainedError, match="holds no open_clip weights"):
        load_pretrained(_fresh(cfg, seed=5), cfg.model)


def test_mismatched_weights_are_refused_with_key_names_or_loaded_in_part(source, tmp_path, caplog):
    folder, _ = source
    cfg = _config(VIT, f"model.pretrained={folder}")  # a ViT model, a ResNet export
    with pytest.raises(PretrainedError, match=r"missing \(visual\.") as refused:
        load_pretrained(_fresh(cfg, seed=0), cfg.model)
    assert "unexpected (visual.head.proj.weight, visual.trunk." in str(refused.value)
    # one text weight reshaped: named with both shapes
    from safetensors.torch import load_file

    state = load_file(str(folder / "open_clip_model.safetensors"))
    state["text_projection"] = torch.zeros(7, 7)
    save_file(state, str(tmp_path / "bad.safetensors"))
    cfg = _config(f"model.pretrained={tmp_path / 'bad.safetensors'}")
    with pytest.raises(PretrainedError, match=r"shape mismatch \(text_projection \(7, 7\) != \(128, 128\)\)"):
        load_pretrained(_fresh(cfg, seed=0), cfg.model)
    cfg = _config(f"model.pretrained={tmp_path / 'bad.safetensors'}", "model.pretrained_strict=false")
    model = _fresh(cfg, seed=0)
    kept = model.clip.text_projection.detach().clone()
    with caplog.at_level("WARNING", logger="mmcontrast.pretrained"):
        load_pretrained(model, cfg.model)
    assert torch.equal(model.clip.text_projection, kept)
    assert torch.equal(model.clip.token_embedding.weight, state["token_embedding.weight"])
    assert "not loaded (kept their initialisation): text_projection" in caplog.text


def test_a_pickle_that_runs_code_is_not_loaded(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": Payload()}}, path)
    cfg = _config(f"model.pretrained={path}")
    with pytest.raises(PretrainedError, match="not a weights-only torch checkpoint"):
        load_pretrained(_fresh(cfg, seed=0), cfg.model)


def test_audio_tower_from_a_timm_checkpoint(tmp_path):
    import timm

    torch.manual_seed(11)
    backbone = timm.create_model("resnet10t", num_classes=10)  # RGB stem and a classifier
    torch.save(backbone.state_dict(), tmp_path / "resnet10t.pth")
    cfg = _config(f"model.audio.pretrained={tmp_path / 'resnet10t.pth'}")
    model = _fresh(cfg, seed=0)
    load_pretrained(model, cfg.model)
    tower = model.towers["audio"].backbone
    assert torch.equal(tower.layer3[0].conv1.weight, backbone.layer3[0].conv1.weight)
    torch.testing.assert_close(tower.conv1[0].weight, backbone.conv1[0].weight.sum(dim=1, keepdim=True))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.clip=hf-hub:timm/ViT-B-16-SigLIP", "nothing is downloaded"),
        ("model.audio.backbone_kwargs={pretrained: true}", "give a local timm checkpoint"),
        ("model.pretrained=/no/such/file.pt", "an existing local file"),
        ("model.lock={video: true}", "image, text, audio"),
        ("model.lock={text: {unlocked_groups: 1}}", "unlocked_layers"),
        ("model.lock={image: {unlocked_groups: -1}}", "an integer >= 0"),
        ("model.patch_dropout=1.0", "0 <= p < 1"),
        ("train.layer_decay={image: 1.5}", "<= 1"),
        ("train.lr_scale={audio: 0}", "a number > 0"),
        ("train.ema={decay: 1.0}", "0 < decay < 1"),
    ],
)
def test_bad_starting_options_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        _config(override)


def test_lock_follows_open_clip_and_keeps_locked_towers_in_eval():
    cfg = _config(VIT, "model.lock={image: {unlocked_groups: 2}, text: true, audio: {unlocked_groups: 1}}")
    model = build_model(cfg.model, cfg.modalities)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # open_clip's ViT groups: [stem], blocks 0..n-2, [last block, ln_post], proj
    reference = open_clip.create_model(f"local-dir:{_folder_of(model)}")
    reference.lock_image_tower(unlocked_groups=2)
    expected_image = {
        f"clip.{n}" for n, p in reference.named_parameters() if p.requires_grad and n.startswith("visual.")
    }
    assert {n for n in trainable if n.startswith("clip.visual.")} == expected_image
    assert "clip.visual.transformer.resblocks.2.attn.in_proj_weight" in expected_image
    assert "clip.visual.transformer.resblocks.1.attn.in_proj_weight" not in expected_image
    assert not any(
        n.startswith(("clip.transformer.", "clip.token_embedding", "clip.text_projection")) for n in trainable
    )
    assert {n for n in trainable if n.startswith("towers.audio.")} == {"towers.audio.proj.weight"}
    assert model.locked == {"text"}
    model.train()
    assert model.clip.transformer.training is False and model.clip.visual.training is True
    batch = _batch(model)
    assert not model.encode("text", batch["text"]).requires_grad  # no autograd graph kept
    assert model.encode("image", batch["image"]).requires_grad


def _folder_of(model):
    import tempfile

    folder = tempfile.mkdtemp()
    with open(f"{folder}/open_clip_config.json", "w") as f:
        json.dump({"model_cfg": model.clip_cfg, "preprocess_cfg": {}}, f)
    return folder


def test_frozen_batch_norm_statistics_do_not_move():
    cfg = _config("model.lock={image: true, audio: {unlocked_groups: 1, freeze_bn_stats: true}}")
    model = build_model(cfg.model, cfg.modalities).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    batch = _batch(model)
    model(batch)
    after = model.state_dict()
    moved = {k.split(".")[0] + "." + k.split(".")[1] for k in before if not torch.equal(before[k], after[k])}
    assert moved == set()  # image locked whole, audio's frozen groups: no statistic moved
    unlocked = _config().model
    free = build_model(unlocked, cfg.modalities).train()
    state = {k: v.clone() for k, v in free.state_dict().items() if "running" in k}
    free(batch)
    assert any(not torch.equal(state[k], free.state_dict()[k]) for k in state)  # the test can fail


def test_layer_decay_and_tower_scales_give_each_block_its_learning_rate():
    cfg = _config(
        VIT, "train.lr_scale={image: 0.5, audio: 2.0}", "train.layer_decay={image: 0.75, text: 0.5}"
    )
    model = build_model(cfg.model, cfg.modalities)
    base = 1e-3
    groups = param_groups(model, 0.1, base, cfg.train.lr_scale, cfg.train.layer_decay)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    n_image, n_text = 3, 2  # blocks; layer ids 0 (embeddings) .. blocks + 1 (final norm, projection)
    for i in range(n_image):
        p = names[f"clip.visual.transformer.resblocks.{i}.mlp.c_fc.weight"]
        assert lr_of[id(p)] == pytest.approx(base * 0.5 * 0.75 ** (n_image + 1 - (i + 1)))
    assert lr_of[id(names["clip.visual.conv1.weight"])] == pytest.approx(base * 0.5 * 0.75 ** (n_image + 1))
    assert lr_of[id(names["clip.visual.proj"])] == pytest.approx(base * 0.5)
    for i in range(n_text):
        p = names[f"clip.transformer.resblocks.{i}.attn.in_proj_weight"]
        assert lr_of[id(p)] == pytest.approx(base * 0.5 ** (n_text + 1 - (i + 1)))
    assert lr_of[id(names["clip.token_embedding.weight"])] == pytest.approx(base * 0.5 ** (n_text + 1))
    assert lr_of[id(names["towers.audio.backbone.layer1.0.conv1.weight"])] == pytest.approx(base * 2.0)
    assert lr_of[id(names["clip.logit_scale"])] == pytest.approx(base)
    # the schedule scales every group alike
    optimizer = torch.optim.AdamW(groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(2, 10, 0.0))
    for _ in range(4):
        optimizer.step()
        schedule.step()
    factor = warmup_cosine(2, 10, 0.0)(4)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(base * group["lr_scale"] * factor)
    # without scales: the two groups of before, undecayed first
    plain = param_groups(model, 0.1, base)
    assert [g["weight_decay"] for g in plain] == [0.0, 0.1] and all(g["lr"] == base for g in plain)


def test_locked_parameters_get_no_optimizer_group():
    cfg = _config("model.lock={image: true}")
    model = build_model(cfg.model, cfg.modalities)
    grouped = {id(p) for g in param_groups(model, 0.1, 1e-3) for p in g["params"]}
    image = [p for n, p in model.named_parameters() if n.startswith("clip.visual.")]
    assert image and not any(id(p) in grouped for p in image)


def test_layer_groups_cover_every_parameter_once():
    for overrides in ((), (VIT,)):
        model = build_model(_config(*overrides).model, ["image", "text", "audio"])
        groups = layer_groups(model)
        assert set(groups) == {n for n, _ in model.named_parameters()}
        assert all(0 <= layer <= top for _, layer, top in groups.values())


def test_patch_dropout_trains_on_fewer_patches_and_evaluates_on_all(tmp_path):
    cfg = _config(VIT, "model.patch_dropout=0.5")
    torch.manual_seed(0)
    dropped = build_model(cfg.model, cfg.modalities)
    torch.manual_seed(0)
    plain = build_model(_config(VIT).model, cfg.modalities).eval()
    plain.load_state_dict(dropped.state_dict())
    images = _batch(plain)["image"]
    dropped.train()
    torch.manual_seed(1)
    first = dropped.encode("image", images)
    second = dropped.encode("image", images)
    assert not torch.allclose(first, second)  # other patches each call
    dropped.eval()
    with torch.no_grad():
        assert torch.equal(dropped.encode("image", images), plain.encode("image", images))
    with pytest.raises(ValueError, match="needs a ViT image tower"):
        build_model(_config("model.patch_dropout=0.5").model, cfg.modalities)


def test_export_ema_of_a_run_without_ema_is_refused(tmp_path):
    from mmcontrast.export import ExportError

    make_run_dir(tmp_path / "run", steps=(5,))
    with pytest.raises(ExportError, match="no weight average"):
        export_run(tmp_path / "run", tmp_path / "export", ema=True)


def test_starting_weights_holding_nan_are_refused(source, tmp_path):
    from safetensors.torch import load_file

    folder, _ = source
    state = load_file(str(folder / "open_clip_model.safetensors"))
    state["text_projection"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    cfg = _config(f"model.pretrained={tmp_path / 'nan.safetensors'}")
    with pytest.raises(PretrainedError, match=r"NaN or infinite values in 1 tensor\(s\): text_projection"):
        load_pretrained(_fresh(cfg, seed=0), cfg.model)
