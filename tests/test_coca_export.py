"""CoCa runs: export to an open_clip local-dir folder whose `generate` gives `mmcontrast caption`'s
captions, and the captioning benchmark of `mmcontrast eval`."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from open_clip.coca_model import CoCa
from PIL import Image

from mmcontrast.cli import main
from mmcontrast.data.demo import make_sample
from mmcontrast.eval.tasks import captioning, mentioned_classes
from mmcontrast.export import export_run, load_exported
from tests.export_helpers import DEMO_COCA_CONFIG, make_run_dir

# What each strategy must mean in open_clip's own terms, written out independently of
# mmcontrast.eval.captions: (generate() keyword arguments).
OPEN_CLIP_ARGS = {
    "greedy": {"generation_type": "top_k", "top_k": 1},
    "top_k": {"generation_type": "top_k", "top_k": 5},
    "top_p": {"generation_type": "top_p", "top_p": 0.9},
    "beam": {"generation_type": "beam_search", "num_beams": 6, "num_beam_groups": 3},
}


@pytest.fixture(scope="module")
def coca_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("coca")
    make_run_dir(root / "run", steps=(10,), config=DEMO_COCA_CONFIG)
    out = export_run(root / "run", root / "export")
    rng = np.random.default_rng(7)
    images = []
    for i in range(5):
        sample = make_sample(f"{i:04d}", rng)
        path = root / f"sample{i}.png"
        path.write_bytes(sample["png"])
        images.append(str(path))
    return {"dir": out, "images": images, "root": root}


def _open_clip_captions(folder, images, strategy, seed=0):
    """Captions the way an open_clip user would make them from the exported folder."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images])
    torch.manual_seed(seed)
    with torch.no_grad():
        tokens = model.generate(batch, seq_len=30, min_seq_len=2, **OPEN_CLIP_ARGS[strategy])
    return [
        open_clip.decode(row).split("<end_of_text>")[0].replace("<start_of_text>", "").strip()
        for row in tokens
    ]


def test_open_clip_loads_the_export_as_coca(coca_export):
    assert open_clip.coca_model._has_transformers, "transformers with BeamSearchScorer is needed for generate"
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{coca_export['dir']}")
    assert isinstance(model, CoCa)
    exported = load_exported(coca_export["dir"])
    assert isinstance(exported.clip, CoCa) and "audio" in exported.towers


@pytest.mark.parametrize("strategy", list(OPEN_CLIP_ARGS))
def test_mmcontrast_caption_equals_open_clip_generate(coca_export, strategy, capsys):
    main(["caption", str(coca_export["dir"]), *coca_export["images"], "--strategy", strategy])
    lines = capsys.readouterr().out.strip().splitlines()
    ours = [line.split("\t", 1)[1] if "\t" in line else "" for line in lines]
    assert [line.split("\t", 1)[0] for line in lines] == coca_export["images"]
    theirs = _open_clip_captions(coca_export["dir"], coca_export["images"], strategy)
    assert ours == theirs
    assert any(ours), "an untrained model still writes some tokens"


def test_caption_refuses_broken_input(coca_export, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n not really")
    with pytest.raises(SystemExit) as exc:
        main(["caption", str(coca_export["dir"]), coca_export["images"][0], str(broken)])
    assert exc.value.code == 1 and "broken.png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["caption", str(coca_export["dir"]), coca_export["images"][0], "--min-tokens", "40"])
    assert "min_tokens" in capsys.readouterr().err


def test_caption_refuses_a_clip_export(tmp_path, capsys):
    make_run_dir(tmp_path / "run", steps=(5,))
    export_run(tmp_path / "run", tmp_path / "export")
    image = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(image)
    with pytest.raises(SystemExit):
        main(["caption", str(tmp_path / "export"), str(image)])
    assert "not a CoCa export" in capsys.readouterr().err


CLASSES = ["red circle", "blue star", "green square", "circle"]


def test_caption_check_by_hand():
    assert mentioned_classes("a red circle to the left of a Blue Star", CLASSES) == {
        "red circle": 1,
        "blue star": 1,
    }
    assert mentioned_classes("a circle", CLASSES) == {"circle": 1}  # the longest name wins
    assert not mentioned_classes("red and circular", CLASSES[:3])
    metrics = captioning(
        [
            "a photo of a red circle",
            "a red square",
            "a red circle and a blue star",
            "",
            "a green square and a blue star",
        ],
        [
            ["red circle"],
            ["red circle"],
            ["red circle"],
            ["blue star", "green square"],
            ["blue star", "green square"],
        ],
        ["single_object", "single_object", "single_object", "two_object", "two_object"],
        CLASSES,
    )
    # an object too many is as wrong as one too few
    assert metrics == {"single_object": 1 / 3, "single_object/n": 3, "two_object": 0.5, "two_object/n": 2}


def test_caption_eval_of_an_export(coca_export, tmp_path):
    """`mmcontrast eval` on a CoCa export captions the images of a captioning benchmark."""
    from mmcontrast.data.demo import write_demo_world
    from mmcontrast.eval.run import evaluate_export

    world = write_demo_world(tmp_path / "world", 0, 24, seed=3, samples_per_shard=24)
    captions = [d for d in world["benchmark_dirs"] if d.endswith("demo-captions")]
    metrics = evaluate_export(coca_export["dir"], captions, batch_size=16)
    assert metrics["demo-captions/single_object/n"] + metrics["demo-captions/two_object/n"] == 24
    assert 0.0 <= metrics["demo-captions/single_object"] <= 1.0
    skipped = evaluate_export(coca_export["dir"], captions, batch_size=16, caption_strategy="")
    assert skipped == {}
