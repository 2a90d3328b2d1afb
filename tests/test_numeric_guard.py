"""The numeric guard: a non-finite loss or gradient on any rank skips that optimizer step on every
rank, is counted and logged with the batch's keys, and too many in a row stop the run without a
checkpoint of that state."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mmcontrast.faults import NONFINITE_ENV, InjectedFault
from mmcontrast.train.guard import FiniteGuardedAdamW, NonFiniteCounter, NonFiniteError
from mmcontrast.train.metrics import drop_records_after
from tests.distributed import run_ranks


def _step_with_a_loss(rank, world, losses):
    """One stage-0 step as DeepSpeed runs it: backward, gradients all-reduced, the guarded step."""
    import torch.distributed as dist

    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in layer.parameters()]
    opt = FiniteGuardedAdamW(layer.parameters(), lr=0.1)
    loss = layer(torch.ones(4, 3)).square().mean() * losses[rank]
    loss.backward()
    for p in layer.parameters():
        dist.all_reduce(p.grad)
    opt.step()
    unchanged = all(torch.equal(a, p) for a, p in zip(before, layer.parameters(), strict=True))
    return [opt.overflow, unchanged]


@pytest.mark.parametrize(
    ("losses", "skipped"),
    [([1.0, 2.0], False), ([1.0, float("nan")], True), ([float("-inf"), 2.0], True)],
)
def test_a_non_finite_loss_on_any_rank_skips_the_step_on_every_rank(losses, skipped):
    """The chain rule carries the loss's NaN/inf into the gradients, whose reduction reaches
    every rank: the loss needs no check (and no host read) of its own before the backward."""
    assert run_ranks(2, _step_with_a_loss, losses) == [[skipped, skipped], [skipped, skipped]]


def test_guarded_adamw_skips_a_step_with_non_finite_gradients():
    weight = torch.nn.Parameter(torch.ones(3))
    opt = FiniteGuardedAdamW([weight], lr=0.1)
    weight.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert opt.overflow and torch.equal(weight.data, torch.ones(3)) and not opt.state
    weight.grad = torch.tensor([1.0, 1.0, 0.0])
    opt.step()
    assert not opt.overflow and weight.data[0] < 1 and opt.state[weight]["step"] == 1


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_guarded_adamw_clips_as_torch_clip_grad_norm_then_adamw(max_norm):
    """The guard's own clipping (DeepSpeed's is off on its path) against torch's clip_grad_norm_
    followed by a plain AdamW step, clipped (0.5) and unclipped (100)."""
    torch.manual_seed(0)
    shapes = [(4, 3), (3,), (2, 2, 3)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    grads = [torch.randn(s) * 3 for s in shapes]
    guarded = FiniteGuardedAdamW(ours, lr=0.1, max_grad_norm=max_norm)
    plain = torch.optim.AdamW(reference, lr=0.1)
    for p, q, g in zip(ours, reference, grads, strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    norm = torch.nn.utils.clip_grad_norm_(reference, max_norm)
    assert (norm > max_norm) == (max_norm == 0.5)
    guarded.step()
    plain.step()
    for p, q in zip(ours, reference, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(p.data, q.data, rtol=1e-6, atol=1e-7)


def test_counter_resets_on_a_good_step_and_stops_after_the_limit(caplog):
    counter = NonFiniteCounter(limit=3)
    counter.record(1, False, ["a", "b"], "non-finite loss")
    counter.record(2, True, ["c"], "")
    assert counter.state_dict() == {"total": 1, "in_a_row": 0}
    assert "batch keys: a, b" in caplog.text
    counter.last_checkpoint = 2
    counter.record(3, False, ["d"], "non-finite gradients")
    counter.record(4, False, ["e"], "non-finite gradients")
    with pytest.raises(
        NonFiniteError, match=r"3 non-finite steps in a row \(steps 3-5.*checkpoint \(step 2\)"
    ):
        counter.record(5, False, ["f"], "non-finite gradients")
    restored = NonFiniteCounter(limit=3)
    restored.load_state_dict(counter.state_dict())
    assert restored.state_dict() == {"total": 4, "in_a_row": 3}


def test_injected_fault_spec():
    loss = torch.tensor(2.0, requires_grad=True)
    only_rank_1 = InjectedFault("loss:3,4@1", rank=0)
    assert only_rank_1(loss, 3) is loss
    on_rank_1 = InjectedFault("loss:3,4@1", rank=1)
    assert on_rank_1(loss, 4).isnan() and on_rank_1(loss, 5) is loss
    grad_fault = InjectedFault("grad:2", rank=0)(loss, 2)
    assert grad_fault.item() == 2.0
    grad_fault.backward()
    assert loss.grad.isnan()
    with pytest.raises(ValueError, match=NONFINITE_ENV):
        InjectedFault("nan:3", rank=0)


def test_a_resume_from_the_final_checkpoint_drops_the_final_evaluation(tmp_path):
    records = [
        {"step": 4, "loss": 1.0},
        {"step": 4, "val/x/top1": 0.5},  # in-training evaluation, before the step-4 checkpoint
        {"step": 6, "loss": 0.9},
        {"step": 6, "val/x/top1": 0.7},  # the final evaluation, after the final checkpoint
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    drop_records_after(tmp_path, 6, evaluations_at_step=True)
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == records[:3]
    drop_records_after(tmp_path, 4)
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == records[:2]


# ---------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from mmcontrast.data.demo import write_demo_world

    world = write_demo_world(
        tmp_path_factory.mktemp("world"), n_train=128, n_val=0, seed=1, samples_per_shard=16
    )
    return world["urls"]["train"]


def _train(repo_root, shards, run, *extra, fault="", ranks=1):
    from tests.test_train_e2e import TINY

    args = [
        str(repo_root / "configs/demo.yaml"),
        *TINY,
        f"data.train={shards}",
        "eval.benchmarks=[]",
        "data.workers=1",
        f"run.dir={run}",
        *extra,
    ]
    env = {**os.environ, NONFINITE_ENV: fault}
    if ranks == 1:
        cmd = [sys.executable, "-m", "mmcontrast.cli", "train", *args]
    else:
        if torch.cuda.is_available() and torch.cuda.device_count() < ranks:
            env["CUDA_VISIBLE_DEVICES"] = ""  # more ranks than GPUs here: the ranks share the CPU (gloo)
        env.update(
            NNODES="1",
            NPROC_PER_NODE=str(ranks),
            MASTER_PORT=str(29000 + os.getpid() % 400),
            PYTHON=sys.executable,
        )
        cmd = ["bash", str(repo_root / "launch/torchrun.sh"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _weights(run, step):
    from mmcontrast.train.checkpoint import checkpoint_weights

    return checkpoint_weights(run / "checkpoints" / f"step_{step:07d}")  # rebuilt when not written


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "ranks", "extra"),
    [
        ("grad:3,4", 1, []),  # fp32 stage 0: FiniteGuardedAdamW
        ("grad:3,4", 1, ["train.precision=bf16", "train.zero_stage=1"]),  # DeepSpeed's own check
        # only rank 1's loss, under ZeRO-2 and GradCache: its NaN reaches the reduced gradients, so both ranks skip
        ("loss:3,4@1", 2, ["train.zero_stage=2", "train.accumulation=2"]),
    ],
    ids=["grad-fp32-stage0", "grad-bf16-zero1", "loss-one-rank-of-two-zero2-gradcache"],
)
def test_non_finite_steps_change_no_weight_and_are_counted(repo_root, shards, tmp_path, fault, ranks, extra):
    run = tmp_path / "run"
    steps = ["train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=3"]
    done = _train(repo_root, shards, run, *steps, *extra, fault=fault, ranks=ranks)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped the optimizer step on every rank" in done.stderr and "batch keys: " in done.stderr
    before, after, last = _weights(run, 2), _weights(run, 4), _weights(run, 6)
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed weights"
    assert any(not torch.equal(after[k], last[k]) for k in after), "steps 5-6 should train again"
    assert all(v.isfinite().all() for v in last.values())
    counts = {r["step"]: r["nonfinite_steps"] for r in _records(run) if "loss" in r}
    assert counts == {1: 0, 2: 0, 3: 1, 4: 2, 5: 2, 6: 2}


@pytest.mark.slow
def test_too_many_in_a_row_stop_and_leave_the_last_good_checkpoint(repo_root, shards, tmp_path):
    run = tmp_path / "run"
    steps = ["train.steps=10", "train.checkpoint_every=4", "train.max_nonfinite_steps=3"]
    stopped = _train(repo_root, shards, run, *steps, fault="loss:5,6,7,8,9,10")
    assert stopped.returncode == 1
    assert "3 non-finite steps in a row (steps 5-7" in stopped.stderr
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_0000004"]
    assert (checkpoints / "latest").read_text().strip() == "step_0000004"
    assert max(r["step"] for r in _records(run)) == 6  # the stopping step is not logged
    # the checkpoint is intact (its manifest verifies) and a resume without the fault finishes
    resumed = _train(repo_root, shards, run, *steps, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step_0000004 at step 4" in resumed.stderr
    records = [r for r in _records(run) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 11))
    assert records[-1]["nonfinite_steps"] == 0
