"""Export round trip: open_clip's local-dir loader and load_exported reproduce the trained model."""

import json
import shutil

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import mmcontrast
from mmcontrast.export import (
    MMCONTRAST_CONFIG,
    OPEN_CLIP_WEIGHTS,
    ExportError,
    export_run,
    load_exported,
)
from tests.export_helpers import make_run_dir

ATOL = 1e-5
CAPTIONS = ["a red circle", "a photo of a blue star", "a green square to the left of a purple triangle"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg, models = make_run_dir(root / "run", steps=(200, 600))
    out = export_run(root / "run", root / "export")
    return {"root": root, "cfg": cfg, "models": models, "dir": out, "model": models["step_0000600"]}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 64, 64, generator=g)
    audio = torch.randn(3, 16000, generator=g) * 0.3
    return images, audio


def test_open_clip_local_dir_loads_the_trained_image_text_model(exported):
    name = f"local-dir:{exported['dir']}"
    oc_model, _, oc_preprocess = open_clip.create_model_and_transforms(name)
    oc_model.eval()
    oc_tokenizer = open_clip.get_tokenizer(name)
    model = exported["model"]
    images, _ = _inputs()
    tokens = oc_tokenizer(CAPTIONS)
    assert torch.equal(tokens, model.tokenizer(CAPTIONS))
    with torch.no_grad():
        torch.testing.assert_close(
            oc_model.encode_image(images, normalize=True), model.encode("image", images), atol=ATOL, rtol=0
        )
        torch.testing.assert_close(
            oc_model.encode_text(tokens, normalize=True), model.encode("text", tokens), atol=ATOL, rtol=0
        )
    # Stored clamped at ln(100) (the checkpoint holds 5.0), as CLIP uses it.
    assert oc_model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-6)
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    torch.testing.assert_close(oc_preprocess(pil), model.val_transform(pil))


def test_load_exported_matches_training_model(exported):
    model = exported["model"]
    loaded = load_exported(exported["dir"])
    images, audio = _inputs(1)
    tokens = loaded.tokenizer(CAPTIONS)
    with torch.no_grad():
        pairs = {
            "image": (loaded.encode_image(images), model.encode("image", images)),
            "text": (loaded.encode_text(tokens), model.encode("text", tokens)),
            "audio": (loaded.encode_audio(audio), model.encode("audio", audio)),
        }
        for modality, (got, want) in pairs.items():
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=modality)
            torch.testing.assert_close(got.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
            torch.testing.assert_close(
                loaded.encode(modality, {"image": images, "audio": audio, "text": tokens}[modality]), got
            )
    assert loaded.modalities == ["image", "text", "audio"]
    assert loaded.logit_scale == pytest.approx(model.logit_scale().item())
    assert (loaded.audio_sample_rate, loaded.audio_num_samples) == (16000, 16000)
    assert not loaded.training
    assert loaded.val_transform is loaded.preprocess


def test_export_metadata(exported):
    meta = json.loads((exported["dir"] / MMCONTRAST_CONFIG).read_text())
    assert meta["source"]["tag"] == "step_0000600" and meta["source"]["step"] == 600
    assert meta["towers"]["audio"]["config"]["backbone"] == "resnet10t"
    oc = json.loads((exported["dir"] / "open_clip_config.json").read_text())
    assert oc["model_cfg"]["embed_dim"] == 128 and oc["preprocess_cfg"]["size"] == [64, 64]
    # The package-level helper delegates to the same loader.
    assert mmcontrast.load_exported(exported["dir"]).embed_dim == 128


def test_export_a_given_tag(exported, tmp_path):
    out = export_run(exported["root"] / "run", tmp_path / "old", tag="step_0000200")
    loaded = load_exported(out)
    images, _ = _inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_image(images),
            exported["models"]["step_0000200"].encode("image", images),
            atol=ATOL,
            rtol=0,
        )
    assert json.loads((out / MMCONTRAST_CONFIG).read_text())["source"]["step"] == 200
    # Exporting again to the same folder replaces the earlier export whole.
    export_run(exported["root"] / "run", out)
    assert json.loads((out / MMCONTRAST_CONFIG).read_text())["source"]["step"] == 600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_run_dir_without_checkpoint_is_refused(tmp_path):
    make_run_dir(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    with pytest.raises(ExportError, match="no checkpoint to export"):
        export_run(tmp_path / "run", tmp_path / "export")
    with pytest.raises(ExportError, match="not a run directory"):
        export_run(tmp_path / "nowhere", tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_latest_naming_a_missing_checkpoint_is_refused(tmp_path):
    make_run_dir(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_0000999")
    with pytest.raises(ExportError, match="step_0000999.*has no weights: neither .*model.safetensors"):
        export_run(tmp_path / "run", tmp_path / "export")


@pytest.mark.parametrize("missing", ["audio_tower.safetensors", OPEN_CLIP_WEIGHTS, MMCONTRAST_CONFIG])
def test_incomplete_export_is_refused(exported, tmp_path, missing):
    broken = tmp_path / "broken"
    shutil.copytree(exported["dir"], broken)
    (broken / missing).unlink()
    with pytest.raises(ExportError, match=f"incomplete: missing {missing}"):
        load_exported(broken)


def test_crash_during_export_leaves_previous_export(exported, tmp_path, monkeypatch):
    out = export_run(exported["root"] / "run", tmp_path / "export")
    before = {p.name: p.stat().st_size for p in out.iterdir()}

    def crash(folder, *args):
        (folder / OPEN_CLIP_WEIGHTS).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("mmcontrast.export._write_export", crash)
    with pytest.raises(OSError, match="disk full"):
        export_run(exported["root"] / "run", out)
    assert {p.name: p.stat().st_size for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp folders left behind
    load_exported(out)


def test_export_never_overwrites_a_foreign_folder(exported, tmp_path):
    target = tmp_path / "notes"
    target.mkdir()
    (target / "todo.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an export"):
        export_run(exported["root"] / "run", target)
    assert (target / "todo.txt").read_text() == "keep me"
