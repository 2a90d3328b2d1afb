"""Elastic resume: a run continued on another number of ranks or workers reads every sample of
the interrupted epoch exactly once."""

import json

import pytest

from mmcontrast.data.demo import write_demo_world
from tests.test_pipeline import cfg, loader, take


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """128 samples in 8 shards of 16."""
    out = tmp_path_factory.mktemp("world")
    world = write_demo_world(out, n_train=128, n_val=0, seed=3, samples_per_shard=16)
    return world["urls"]["train"], {f"{i:06d}" for i in range(128)}


def _loaders(urls, tok, tf, world, workers):
    c = cfg(workers=workers, shuffle_buffer=10, audio_seconds=0.5)
    return [loader(urls, c, tok, tf, train=True, rank=r, world_size=world) for r in range(world)]


def _epoch_keys(it, epoch=0):
    """Keys of the batches `it` gives while in `epoch` (the first batch past it is dropped)."""
    keys = []
    for batch in it:
        if batch["position"]["epoch"] != epoch:
            return keys
        keys += batch["__key__"]
    return keys


@pytest.mark.parametrize(
    ("before", "after", "consumed"),
    [((2, 0), (1, 2), 5), ((1, 1), (2, 1), 6), ((2, 1), (1, 0), 3), ((1, 2), (2, 2), 4)],
    ids=[
        "2 ranks -> 1 rank with 2 workers",
        "1 rank -> 2 ranks",
        "2 -> 1, workers 1 -> 0",
        "1 -> 2, 2 workers",
    ],
)
def test_every_sample_of_the_epoch_is_read_once_across_the_change(shards, tok, tf, before, after, consumed):
    urls, _ = shards
    old = _loaders(urls, tok, tf, *before)
    seen = []
    positions = []
    for ld in old:
        it = iter(ld)
        seen += [k for b in take(it, consumed) for k in b["__key__"]]
        positions.append(json.loads(json.dumps(ld.state_dict())))  # what each rank's checkpoint holds
        del it
    everything = set(k for ld in _loaders(urls, tok, tf, 1, 0) for k in _epoch_keys(iter(ld)))
    assert len(everything) == 128
    new = _loaders(urls, tok, tf, *after)
    for ld in new:
        ld.continue_layout(positions)
        seen += _epoch_keys(iter(ld))
    assert len(seen) == len(set(seen)), "a sample was read twice"
    assert set(seen) == everything, f"{len(everything - set(seen))} samples of the epoch were never read"


def test_a_resume_during_the_continued_epoch_is_exact(shards, tok, tf):
    urls, _ = shards
    (first,) = _loaders(urls, tok, tf, 1, 1)
    it = iter(first)
    take(it, 6)
    position = first.state_dict()
    del it
    (continued,) = _loaders(urls, tok, tf, 2, 2)[:1]
    continued.continue_layout([position])
    it = iter(continued)
    reference = take(it, 7)
    (again,) = _loaders(urls, tok, tf, 2, 2)[:1]
    again.continue_layout([position])
    it2 = iter(again)
    take(it2, 3)
    saved = json.loads(json.dumps(again.state_dict()))
    assert saved["carry"] is not None
    del it2
    (resumed,) = _loaders(urls, tok, tf, 2, 2)[:1]
    resumed.load_state_dict(saved)
    got = take(iter(resumed), 4)
    assert [b["__key__"] for b in got] == [b["__key__"] for b in reference[3:]]
    # a different layout in the middle of a continued epoch is refused with a sentence
    (other,) = _loaders(urls, tok, tf, 1, 0)
    with pytest.raises(ValueError, match="was itself continuing another layout"):
        other.continue_layout([saved])


# ---------------------------------------------------------------- real runs


def _train(repo_root, urls, run, ranks, steps, keys_dir, *extra):
    import os
    import subprocess
    import sys

    from mmcontrast.faults import RECORD_KEYS_ENV
    from tests.fault_campaign import _free_port
    from tests.test_train_e2e import TINY

    args = [str(repo_root / "configs/demo.yaml"), *TINY, f"data.train={urls}", "eval.benchmarks=[]"]
    args += [f"run.dir={run}", f"train.steps={steps}", "train.checkpoint_every=100", *extra]
    keys_dir.mkdir(exist_ok=True)
    env = {**os.environ, RECORD_KEYS_ENV: str(keys_dir)}
    if ranks == 1:
        cmd = [sys.executable, "-m", "mmcontrast.cli", "train", *args]
    else:
        env.update(
            NNODES="1", NPROC_PER_NODE=str(ranks), MASTER_PORT=str(_free_port()), PYTHON=sys.executable
        )
        cmd = ["bash", str(repo_root / "launch/torchrun.sh"), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _trained_keys(keys_dir, epoch=0):
    keys = []
    for path in sorted(keys_dir.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["epoch"] == epoch:
                keys += record["keys"]
    return keys


@pytest.mark.slow
@pytest.mark.parametrize(
    ("before", "after", "engine"),
    [
        ((2, 3), (1, 13), ["train.zero_stage=1"]),
        ((1, 4), (2, 10), ["train.zero_stage=2"]),
    ],
    ids=["2 ranks -> 1 rank, ZeRO-1", "1 rank -> 2 ranks, ZeRO-2"],
)
def test_training_resumed_on_another_number_of_ranks_reads_the_epoch_once(
    repo_root, shards, tmp_path, before, after, engine
):
    """Batches of 8, one worker per rank: 2 ranks read 64 samples each per epoch, 1 rank 128. The
    optimizer state, partitioned by rank, is resharded through DeepSpeed's universal checkpoint."""
    urls, _ = shards
    run, keys_dir = tmp_path / "run", tmp_path / "keys"
    fixed = ["data.workers=1", "data.resampled=false", *engine]  # the demo config resamples shards
    _train(repo_root, urls, run, before[0], before[1], keys_dir, *fixed)
    log = _train(repo_root, urls, run, after[0], after[1], keys_dir, *fixed, "--resume")
    assert "the rest of epoch 0 is read once" in log and "resharding" in log
    seen = _trained_keys(keys_dir)
    assert len(seen) == len(set(seen)) == 128, "a sample of epoch 0 was trained on twice, or never"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, after[1] + 1))
    assert not (run / "checkpoints" / "universal" / f"step_{before[1]:07d}").exists()
    # Adam's step counts went on from the checkpoint's: the optimizer state was restored, not new
    assert _adam_steps(run / "checkpoints" / f"step_{after[1]:07d}") == {after[1]}


def _adam_steps(folder) -> set[int]:
    """Every Adam `step` count held in a checkpoint's optimizer files."""
    import torch

    found = set()

    def walk(value):
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "step" and isinstance(item, (int, float, torch.Tensor)):
                    found.add(int(item))
                else:
                    walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    for path in folder.glob("*optim_states.pt"):
        walk(torch.load(path, weights_only=False)["optimizer_state_dict"])
    return found


def _check_resume(rank, world, run_dir, zero_stage):
    from mmcontrast.config import load_config
    from mmcontrast.train.resume import ResumeError, check_resume

    cfg = load_config(None, [f"run.dir={run_dir}", f"train.zero_stage={zero_stage}"])
    try:
        return check_resume(cfg, world, "required")
    except ResumeError as exc:
        return str(exc)


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_only_zero3_is_refused_on_another_number_of_ranks(tmp_path, zero_stage):
    """A checkpoint of 2 ranks (as an older mmcontrast wrote it: no manifest) resumed on 1."""
    import torch
    import yaml

    from mmcontrast.config import load_config
    from tests.distributed import run_ranks

    run = tmp_path / "run"
    folder = run / "checkpoints" / "step_0000002"
    folder.mkdir(parents=True)
    for rank in range(2):
        torch.save({"step": 2}, folder / f"rank{rank}.pt")
    (run / "checkpoints" / "latest").write_text("step_0000002")
    saved = load_config(None, [f"run.dir={run}", f"train.zero_stage={zero_stage}"])
    (run / "config.yaml").write_text(yaml.safe_dump(saved.to_dict()))
    (answer,) = run_ranks(1, _check_resume, str(run), zero_stage)
    if zero_stage == 3:
        assert "a ZeRO stage 3 run resumes only on the number of ranks that wrote it" in answer
    else:
        assert answer == "step_0000002"
