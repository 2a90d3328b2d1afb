"""The headline claims on the full demo world: `make demo`'s config reaches >= 90% zero-shot on
the demo's benchmark folders (and clip_benchmark agrees on the image set), and training with
hard-negative captions (configs/demo-negatives.yaml) beats that baseline on the compositional
benchmark without costing zero-shot accuracy.

CI trains both configs for CI_STEPS of their 600 steps (half the time; the two runs were most of
CI's time), the same schedule on both sides, so the comparison stays fair. `make demo` and
`mmcontrast train configs/demo-negatives.yaml` run the whole schedule, where the negatives reach
the higher bounds of issue 7 (swap_att >= 0.90; benchmarks/RESULTS.md has the figures)."""

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

BENCHMARKS = ("demo-classes", "demo-retrieval", "demo-composition")
CI_STEPS = 300


def _cli(*args, timeout=2400):
    subprocess.run([sys.executable, "-m", "mmcontrast.cli", *args], check=True, timeout=timeout)


@pytest.fixture(scope="module")
def world(demo_world):
    return demo_world


def _train(repo_root, world, run, config):
    _cli(
        "train",
        str(repo_root / "configs" / config),
        f"run.dir={run}",
        "train.progress=false",
        f"data.train={world}/train-{{000000..000007}}.tar",
        f"eval.benchmarks=[{', '.join(str(world / 'benchmarks' / b) for b in BENCHMARKS)}]",
        f"train.steps={CI_STEPS}",
        f"train.warmup={CI_STEPS // 12}",
        f"train.checkpoint_every={CI_STEPS // 2}",
    )


def _final_evaluation(run) -> dict:
    """The in-training final evaluation (the baseline test shows it equals the export's)."""
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    return {k.removeprefix("val/"): v for k, v in final.items() if k.startswith("val/")}


def _train_export_eval(repo_root, world, out, config):
    run, export = out / "run", out / "export"
    _train(repo_root, world, run, config)
    _cli("export", str(run), "--out", str(export))
    benchmarks = [f"--benchmark={world}/benchmarks/{b}" for b in BENCHMARKS]
    _cli("eval", str(export), *benchmarks, "--out", str(out / "metrics.json"))
    return run, json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def baseline(repo_root, world, tmp_path_factory):
    return _train_export_eval(repo_root, world, tmp_path_factory.mktemp("baseline"), "demo.yaml")


def test_demo_learns_image_and_audio_zero_shot(baseline, world, tmp_path, monkeypatch):
    run, metrics = baseline
    print("\ndemo metrics:", json.dumps({k: v for k, v in metrics.items() if "/encoded/" not in k}))
    assert metrics["demo-classes/image/n"] >= 400 and metrics["demo-classes/audio/n"] >= 400
    assert metrics["demo-classes/image/top1"] >= 0.90
    assert metrics["demo-classes/audio/top1"] >= 0.90
    # the in-training final evaluation (on the training model) agrees with the export's
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    for key, value in metrics.items():
        if "/encoded/" not in key:
            assert final[f"val/{key}"] == pytest.approx(value, abs=1e-6), key
    # clip_benchmark on the same folder and export: within half a point
    from tests.test_eval import clip_benchmark_metrics

    cb = clip_benchmark_metrics(
        run.parent / "export", world / "benchmarks" / "demo-classes", tmp_path, monkeypatch
    )
    print("clip_benchmark:", json.dumps(cb))
    assert cb["acc1"] == pytest.approx(metrics["demo-classes/image/top1"], abs=0.005)
    assert cb["acc5"] == pytest.approx(metrics["demo-classes/image/top5"], abs=0.005)


def test_hard_negatives_beat_the_baseline_on_composition(repo_root, world, baseline, tmp_path):
    _, base = baseline
    run = tmp_path / "run"
    _train(repo_root, world, run, "demo-negatives.yaml")
    negatives = _final_evaluation(run)
    table = {
        c: (base[f"demo-composition/{c}"], negatives[f"demo-composition/{c}"])
        for c in ("swap_att", "swap_obj", "replace_att", "replace_obj", "replace_rel")
    }
    print("\ncomposition (baseline, negatives):", json.dumps(table))
    assert negatives["demo-composition/swap_att"] >= 0.72
    assert negatives["demo-composition/replace_att"] >= 0.95
    assert negatives["demo-composition/swap_att"] > base["demo-composition/swap_att"]
    assert negatives["demo-composition/replace_rel"] > base["demo-composition/replace_rel"]
    assert negatives["demo-classes/image/top1"] >= base["demo-classes/image/top1"] - 0.02
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("negclip/image-text" in r for r in logged)


def test_bind_audio_to_the_locked_demo_model(repo_root, world, baseline, tmp_path):
    """configs/bind-audio.yaml from the baseline's export: a fresh audio tower learns to >= 90%
    audio zero-shot in 300 steps while image zero-shot stays exactly the source's."""
    from safetensors.torch import load_file

    base_run, base = baseline
    source = base_run.parent / "export"
    run = tmp_path / "run"
    _cli(
        "train",
        str(repo_root / "configs" / "bind-audio.yaml"),
        f"run.dir={run}",
        "train.progress=false",
        f"model.pretrained={source}",
        f"data.train={world}/train-{{000000..000007}}.tar",
        f"eval.benchmarks=[{world / 'benchmarks' / 'demo-classes'}]",
    )
    bound = _final_evaluation(run)
    print(
        "\nbind-audio: audio top1",
        bound["demo-classes/audio/top1"],
        "(source's own audio tower",
        base["demo-classes/audio/top1"],
        "); image top1",
        bound["demo-classes/image/top1"],
        "(source",
        base["demo-classes/image/top1"],
        ")",
    )
    assert bound["demo-classes/audio/top1"] >= 0.90
    assert bound["demo-classes/image/top1"] == base["demo-classes/image/top1"]
    assert bound["demo-classes/image/top5"] == base["demo-classes/image/top5"]
    final = load_file(str(run / "checkpoints" / "step_0000300" / "model.safetensors"))
    initial = load_file(str(source / "open_clip_model.safetensors"))
    frozen = [k for k in final if k.startswith("clip.") and k not in ("clip.logit_scale",)]
    assert all(torch.equal(final[k], initial[k.removeprefix("clip.")]) for k in frozen)
