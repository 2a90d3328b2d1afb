"""A seeded fault campaign: SIGKILL real training runs at random moments, resume, repeat, and
compare the final weights and metrics.jsonl with an uninterrupted run, bit for bit.

    python -m tests.fault_campaign --rounds 5 --ranks 1 2 [--seed 0] [--kills 3]

prints one row per round. Each round draws `kills` faults from a seeded RNG, each at a step
after the checkpoint the run will resume from:
- `step`: SIGKILL after an optimizer step, before its log line and checkpoint;
- `checkpoint`: during a checkpoint write (DeepSpeed's files written, no manifest or `latest`);
- `eval`: during an evaluation, between its two benchmarks;
- `timer`: an external SIGKILL of the whole process group a random time after a step was logged;
and on 2 ranks the point faults hit only rank 1 half of the time: the other rank and torchrun
must then exit within seconds (the time is printed). Round 0's first fault comes before the
first checkpoint. After each kill the run is restarted with `--resume-if-exists`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from mmcontrast.faults import KILL_ENV, KILL_STAMP_ENV
from tests.test_train_e2e import TINY as TINY_TRAINING
from tests.tolerances import same_record, same_tensor

REPO = Path(__file__).resolve().parent.parent
STEPS, CHECKPOINT_EVERY, EVAL_EVERY = 10, 3, 4
TINY = [
    *TINY_TRAINING,
    "data.workers=1",
    "eval.batch_size=32",
    f"train.steps={STEPS}",
    f"train.checkpoint_every={CHECKPOINT_EVERY}",
    f"train.eval_every={EVAL_EVERY}",
]
CHECKPOINT_STEPS = sorted({*range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY), STEPS})
EVAL_STEPS = sorted({*range(EVAL_EVERY, STEPS, EVAL_EVERY), STEPS})  # STEPS: the final evaluation
UNLOGGED = ("samples_per_s",)  # wall-clock: differs between any two runs


def make_world(root: Path) -> list[str]:
    """Shards and two small benchmark folders; returns the run overrides that use them."""
    from mmcontrast.data.demo import write_demo_world

    world = write_demo_world(root, n_train=128, n_val=24, seed=1, samples_per_shard=16)
    benchmarks = ", ".join(str(root / "benchmarks" / b) for b in ("demo-classes", "demo-retrieval"))
    return [*TINY, f"data.train={world['urls']['train']}", f"eval.benchmarks=[{benchmarks}]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(overrides: list[str], run: Path, ranks: int) -> tuple[list[str], dict]:
    args = [str(REPO / "configs/demo.yaml"), *overrides, f"run.dir={run}", "--resume-if-exists"]
    env = {k: v for k, v in os.environ.items() if k not in (KILL_ENV, KILL_STAMP_ENV)}
    if ranks == 1:
        return [sys.executable, "-m", "mmcontrast.cli", "train", *args], env
    env.update(NNODES="1", NPROC_PER_NODE=str(ranks), MASTER_PORT=str(_free_port()), PYTHON=sys.executable)
    return ["bash", str(REPO / "launch/torchrun.sh"), *args], env


def _last_logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except ValueError:  # a line being written
        return 0


def _resume_step(run: Path) -> int:
    latest = run / "checkpoints" / "latest"
    return int(latest.read_text().strip().split("_")[1]) if latest.is_file() else 0


@dataclass
class Fault:
    kind: str  # step | checkpoint | eval | timer
    step: int = 0  # point faults: the step; timer: 0
    delay: float = 0.0  # timer: seconds after the first new log line
    only_rank: int | None = None  # point faults on 2 ranks: None (every rank) or 1

    def __str__(self) -> str:
        if self.kind == "timer":
            return f"timer+{self.delay:.1f}s"
        return f"{self.kind}@{self.step}" + (f"/rank{self.only_rank}" if self.only_rank is not None else "")


def draw_fault(
    rng: random.Random, after: int, ranks: int, before_first_checkpoint: bool, kills_left: int = 1
) -> Fault | None:
    """A fault at a step after `after` (the step the run resumes from), early enough to leave
    room for `kills_left - 1` more; None if none is left."""
    if before_first_checkpoint:
        return Fault("step", rng.randint(1, CHECKPOINT_EVERY - 1))
    last = min(STEPS, after + max(CHECKPOINT_EVERY, (STEPS - after) // kills_left))
    choices = {
        "step": [s for s in range(after + 1, last + 1)],
        "checkpoint": [s for s in CHECKPOINT_STEPS if after < s <= last],
        "eval": [s for s in EVAL_STEPS if after < s <= last],
        "timer": [0] if after < STEPS else [],
    }
    kinds = [k for k, steps in choices.items() if steps]
    if not kinds:
        return None
    kind = rng.choice(kinds)
    if kind == "timer":
        return Fault("timer", delay=round(rng.uniform(0.0, 4.0), 1))
    only_rank = 1 if ranks > 1 and rng.random() < 0.5 else None
    return Fault(kind, rng.choice(choices[kind]), only_rank=only_rank)


@dataclass
class Outcome:
    faults: list[str] = field(default_factory=list)
    killed: int = 0
    peer_exit_s: list[float] = field(default_factory=list)  # one-rank kills: until the job ended
    weights_identical: bool = False
    metrics_identical: bool = False
    first_difference: str = ""


def _run_with_fault(overrides, run, ranks, fault: Fault, timeout: float) -> tuple[bool, float | None]:
    """(killed, seconds from a one-rank kill to the job's exit)."""
    cmd, env = _command(overrides, run, ranks)
    stamp = run.parent / f"{run.name}.kill-stamp"
    stamp.unlink(missing_ok=True)
    if fault.kind != "timer":
        env[KILL_ENV] = f"{fault.kind}:{fault.step}" + (
            f"@{fault.only_rank}" if fault.only_rank is not None else ""
        )
        env[KILL_STAMP_ENV] = str(stamp)
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        if fault.kind == "timer":
            resumed_at = _resume_step(run)
            deadline = time.time() + timeout
            while proc.poll() is None and _last_logged_step(run) <= resumed_at and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(fault.delay)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
        stderr = proc.stderr.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if fault.kind == "timer":
        return proc.returncode != 0, None
    if not stamp.is_file():
        if proc.returncode != 0:
            raise RuntimeError(f"run failed without the injected kill:\n{stderr[-3000:]}")
        return False, None
    peer_exit = time.time() - float(stamp.read_text()) if fault.only_rank is not None else None
    return True, peer_exit


def _finish(overrides, run, ranks, timeout) -> None:
    cmd, env = _command(overrides, run, ranks)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"resumed run failed:\n{done.stderr[-3000:]}")


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in UNLOGGED} for line in lines]


def _final_weights(run: Path) -> dict:
    return load_file(str(run / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))


def compare(reference: Path, run: Path, outcome: Outcome) -> None:
    ref, got = _final_weights(reference), _final_weights(run)
    outcome.weights_identical = ref.keys() == got.keys() and all(same_tensor(ref[k], got[k]) for k in ref)
    ref_records, records = _records(reference), _records(run)
    outcome.metrics_identical = len(ref_records) == len(records) and all(
        same_record(a, b) for a, b in zip(ref_records, records, strict=True)
    )
    if not outcome.metrics_identical:
        for i, (a, b) in enumerate(zip(ref_records, records, strict=False)):
            if not same_record(a, b):
                outcome.first_difference = f"record {i}: {a} != {b}"
                break
        else:
            outcome.first_difference = f"{len(ref_records)} records != {len(records)}"


def run_round(
    overrides, reference: Path, run: Path, ranks: int, seed: int, kills: int, first: bool, timeout=600
) -> Outcome:
    rng = random.Random(f"fault-campaign/{seed}/{ranks}")
    outcome = Outcome()
    while outcome.killed < kills:
        fault = draw_fault(
            rng, _resume_step(run), ranks, first and outcome.killed == 0, kills_left=kills - outcome.killed
        )
        if fault is None:
            break
        killed, peer_exit = _run_with_fault(overrides, run, ranks, fault, timeout)
        outcome.faults.append(str(fault) + ("" if killed else " (finished first)"))
        if killed:
            outcome.killed += 1
        if peer_exit is not None:
            outcome.peer_exit_s.append(round(peer_exit, 1))
    _finish(overrides, run, ranks, timeout)
    compare(reference, run, outcome)
    return outcome


def reference_run(overrides, run: Path, ranks: int, timeout=600) -> None:
    _finish(overrides, run, ranks, timeout)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=3)
    args = parser.parse_args(argv)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="fault-campaign-") as tmp:
        root = Path(tmp)
        overrides = make_world(root / "world")
        print(f"{'ranks':>5} {'round':>5}  {'weights':<9} {'metrics':<9} {'peer exit s':<12} faults")
        for ranks in args.ranks:
            reference = root / f"reference-{ranks}"
            reference_run(overrides, reference, ranks)
            for r in range(args.rounds):
                seed = args.seed * 1000 + r
                out = run_round(
                    overrides, reference, root / f"run-{ranks}-{r}", ranks, seed, args.kills, r == 0
                )
                ok = out.weights_identical and out.metrics_identical and out.killed == args.kills
                failures += not ok
                print(
                    f"{ranks:>5} {r:>5}  {'identical' if out.weights_identical else 'DIFFER':<9} "
                    f"{'identical' if out.metrics_identical else 'DIFFER':<9} "
                    f"{','.join(map(str, out.peer_exit_s)) or '-':<12} {'; '.join(out.faults)}",
                    flush=True,
                )
                if out.first_difference:
                    print(f"      first difference: {out.first_difference}")
    print(f"{failures} failing round(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
