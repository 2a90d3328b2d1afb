"""Checkpoints that resume exactly and never leave a half-written latest one.

Layout: RUN_DIR/checkpoints/<tag>/ holds DeepSpeed's files (model, optimizer, scheduler),
rank<r>.pt per rank (step, RNG states, data position), model.safetensors (full fp32 weights,
written at the final step and at train.weights_every; `checkpoint_weights` rebuilds them from
DeepSpeed's files for any other checkpoint) and manifest.json (the SHA-256 of every file,
written once all are fsynced).
RUN_DIR/checkpoints/latest names the newest complete tag; it is replaced atomically only after
every rank has finished writing. A resume verifies the manifest and falls back to the newest
intact checkpoint, saying which file was damaged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from mmcontrast import faults

log = logging.getLogger("mmcontrast.train")


def checkpoint_root(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_tag(run_dir) -> str | None:
    marker = checkpoint_root(run_dir) / "latest"
    return marker.read_text().strip() if marker.is_file() else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _trains_master_weights(engine) -> bool:
    """bf16/fp16 runs: the optimizer holds float32 master copies of the 16-bit parameters."""
    return engine.bfloat16_enabled() or engine.fp16_enabled()


def _fp32_copy(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in state.items()}


def full_state_dict(engine, every_rank: bool = False) -> dict[str, torch.Tensor]:
    """Every weight of the wrapped model, gathered from ZeRO partitions when needed. A collective
    under ZeRO: every rank calls it. Under ZeRO-3 only rank 0 receives the weights unless
    every_rank (then each rank holds a full copy, for a moment, as evaluation needs).

    bf16/fp16 runs train the optimizer's float32 master weights; the 16-bit module weights are
    their rounded copies, so each parameter is replaced by its master weight.
    """
    if engine.zero_optimization_stage() == 3 and every_rank:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            state = _fp32_copy(engine.module.state_dict())  # copied while the partitions are gathered
    elif engine.zero_optimization_stage() == 3:
        state = _fp32_copy(engine._zero3_consolidated_16bit_state_dict() or {})
    else:
        state = _fp32_copy(engine.module.state_dict())
    if _trains_master_weights(engine):
        from deepspeed.utils import safe_get_full_fp32_param

        unpartitioned = _unpartitioned_masters(engine.optimizer)
        for name, param in engine.module.named_parameters():
            if not param.requires_grad:
                continue  # frozen: no master; the module holds it
            master = unpartitioned.get(id(param))
            if master is None:
                # collective for partitioned parameters: every rank calls it, even one whose
                # `state` is empty (ZeRO-3 gives the weights to rank 0 only)
                master = safe_get_full_fp32_param(param)
            if name not in state:
                continue
            if master is None:
                raise RuntimeError(
                    f"no float32 master weight found for {name} under {type(engine.optimizer).__name__}: "
                    "exporting its 16-bit copy would lose the low bits of every trained weight"
                )
            state[name] = master.detach().float().cpu().reshape(state[name].shape).clone()
    return state


def _master_names(engine) -> list[list[str]] | None:
    """For the stage-0 16-bit wrapper: the parameter names of its float32 master groups, in
    their order, so `checkpoint_weights` can place the saved masters without an engine."""
    if engine.zero_optimization_stage() != 0 or not _unpartitioned_masters(engine.optimizer):
        return None
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [[names[id(p)] for p in group] for group in engine.optimizer.fp16_groups]


def _rebuildable_from_deepspeed_files(engine) -> bool:
    """Whether `checkpoint_weights` can rebuild this engine's fp32 weights from its checkpoint
    files: ZeRO 1-3 (DeepSpeed's zero_to_fp32), fp32 at stage 0, and bf16 at stage 0 (the
    per-parameter masters). fp16 at stage 0 keeps flat masters: its checkpoints always carry
    model.safetensors."""
    return (
        engine.zero_optimization_stage() > 0
        or not _trains_master_weights(engine)
        or bool(_unpartitioned_masters(engine.optimizer))
    )


MASTER_NAMES = "mmcontrast_master_names"  # client-state key in DeepSpeed's model-states file


def checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The full float32 weights of the checkpoint in `folder`, as model.safetensors holds them:
    that file when the save wrote it, else rebuilt from DeepSpeed's files alone (no engine, no
    process group): ZeRO 1-3 through DeepSpeed's zero_to_fp32 merge of the partitioned master
    weights; stage 0 from the module state, with a 16-bit run's float32 masters in place of
    their rounded copies."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"))
    states_files = sorted(
        folder.glob("*model_states.pt")
    )  # ZeRO-3 writes one per rank (zero_pp_rank_<r>_...)
    if not states_files:
        raise FileNotFoundError(
            f"checkpoint {folder} has neither model.safetensors nor DeepSpeed's *model_states.pt files"
        )
    states_file = states_files[0]
    # DeepSpeed's own files need a full unpickler (they pickle the config and more): refuse any
    # that names code first, as --resume does
    from mmcontrast.train.safe_pickle import check_checkpoint_pickles

    check_checkpoint_pickles(folder)
    saved = torch.load(states_file, map_location="cpu", weights_only=False)
    config = saved.get("ds_config") or {}
    if (config.get("zero_optimization") or {}).get("stage", 0) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return _fp32_copy(get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name))
    state = dict(saved["module"])
    if (config.get("bf16") or {}).get("enabled") or (config.get("fp16") or {}).get("enabled"):
        names, masters = saved.get(MASTER_NAMES), (saved.get("optimizer") or {}).get("fp32_groups")
        if names is None or masters is None:
            raise RuntimeError(
                f"checkpoint {folder} holds 16-bit weights but no float32 masters mmcontrast can place; "
                "export a checkpoint that has model.safetensors"
            )
        for group_names, group_masters in zip(names, masters, strict=True):
            for name, master in zip(group_names, group_masters, strict=True):
                state[name] = master.reshape(state[name].shape)
    return _fp32_copy(state)


def _unpartitioned_masters(optimizer) -> dict[int, torch.Tensor]:
    """id(16-bit parameter) -> its float32 master, for DeepSpeed's stage-0 16-bit wrapper
    (FP16_UnfusedOptimizer, which bf16 at stage 0 uses with a torch optimizer): it keeps
    per-parameter fp32 copies but no mapping that safe_get_full_fp32_param reads."""
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if not low or not high or not isinstance(high[0], list):
        return {}
    return {id(p): m for lows, highs in zip(low, high, strict=True) for p, m in zip(lows, highs, strict=True)}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error); the message says why and where."""


def describe_write_failure(folder: Path, exc: BaseException) -> str:
    """What went wrong writing `folder`, for people: torch's writer reports a full disk as
    `basic_ios::clear: iostream error`, so a test write and the free space say what it was."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
    message = f"writing checkpoint {folder.name} in {folder.parent} failed: {reason}."
    probe = folder.parent / f".write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as probe_error:
        message += f" A 1 MiB test write there fails too: {probe_error.strerror or probe_error}."
    finally:
        probe.unlink(missing_ok=True)
    try:
        message += f" {shutil.disk_usage(folder.parent).free / 2**20:.1f} MiB are free on that filesystem."
    except OSError:
        pass
    return message


def save_checkpoint(
    engine,
    run_dir,
    step: int,
    rank_state: dict,
    keep: int,
    weights_files=None,
    full_weights: bool = True,
    background: bool = False,
) -> str:
    """Collective: every rank calls it. Returns the tag written.

    full_weights: also gather and write model.safetensors (the trainer asks at the final step and
    at train.weights_every). Without it the save costs only DeepSpeed's own write plus the rank
    files and checksums; `checkpoint_weights` rebuilds the weights when an export needs them.
    An engine whose masters cannot be rebuilt that way (fp16 at stage 0) always writes them.

    background: return once the files are written (DeepSpeed's write, the rank files, the
    weights); fsync, checksums, `latest` and the removal of old checkpoints then run in a thread
    beside training. Until it is done `latest` names the previous checkpoint, so a crash
    resumes from that one. The next save, and finish_checkpoints(), wait for it.

    weights_files: {name: state dict} rank 0 also writes as <tag>/<name>.safetensors (e.g. the
    EMA teacher), before `latest` moves, so a resumed run finds them with the rest. A failed
    write (disk full, I/O error) raises CheckpointWriteError saying why and where, after
    removing the partial folder; `latest` still names the previous checkpoint. The other ranks
    then fail in their next collective.
    """
    root = checkpoint_root(run_dir)
    tag = f"step_{step:07d}"
    finish_checkpoints()  # one save in flight at most
    try:
        full_weights = full_weights or not _rebuildable_from_deepspeed_files(engine)
        _write_checkpoint(engine, root, tag, step, rank_state, weights_files, full_weights)
        dist.barrier()  # every rank's files are written: the list each rank checksums is final
        files = _my_files(root / tag)
        if not background:
            _finish_checkpoint(root, tag, files, keep, dist.get_rank(), dist.get_world_size())
    except Exception as exc:
        message = describe_write_failure(root / tag, exc)
        shutil.rmtree(root / tag, ignore_errors=True)  # never resumed from (no `latest`); frees its space
        log.error("%s The partial folder was removed; `latest` still names the previous checkpoint.", message)
        raise CheckpointWriteError(message) from exc
    if background:
        _start_finishing(root, tag, files, keep)
    else:
        dist.barrier()  # `latest` has moved for every rank
    return tag


_finishing: dict = {"thread": None, "error": None}  # the background part of the last save


def _start_finishing(root: Path, tag: str, files: list[Path], keep: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()

    def run():
        try:
            _finish_checkpoint(root, tag, files, keep, rank, world)
        except BaseException as exc:  # raised by finish_checkpoints(), in the training thread
            _finishing["error"] = (root / tag, exc)

    thread = threading.Thread(target=run, name=f"checkpoint-{tag}", daemon=True)
    _finishing["thread"] = thread
    thread.start()


def finish_checkpoints(timeout: float | None = None) -> None:
    """Waits for the background part of the last save_checkpoint(background=True): checksums,
    `latest`, old checkpoints removed. Raises CheckpointWriteError if it failed. Not collective.
    timeout: give up waiting after that many seconds (a run leaving on an error), saying so."""
    thread, _finishing["thread"] = _finishing["thread"], None
    if thread is not None:
        thread.join(timeout)
        if thread.is_alive():
            log.warning("%s was still finishing; `latest` names the checkpoint before it", thread.name)
            return
    failure, _finishing["error"] = _finishing["error"], None
    if failure is not None:
        folder, exc = failure
        message = describe_write_failure(folder, exc)
        log.error("%s `latest` still names the previous checkpoint.", message)
        raise CheckpointWriteError(message) from exc


def _finish_checkpoint(root: Path, tag: str, files: list[Path], keep: int, rank: int, world: int) -> None:
    """No collective, so it can run beside training: this rank fsyncs and checksums its share of
    the files into a part manifest; rank 0 waits for every part, writes manifest.json, moves
    `latest` and removes checkpoints beyond `keep`."""
    folder = root / tag
    mine = {}
    for path in files:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        mine[str(path.relative_to(folder))] = _sha256(path)
    _write_atomic(folder / f"{MANIFEST_PART}{rank}", json.dumps(mine))
    if rank != 0:
        return
    parts = [folder / f"{MANIFEST_PART}{r}" for r in range(world)]
    deadline = time.monotonic() + MANIFEST_WAIT_S
    while not all(part.is_file() for part in parts):  # the folder is on a filesystem every rank shares
        if time.monotonic() > deadline:
            missing = [part.name for part in parts if not part.is_file()]
            raise TimeoutError(f"ranks did not finish their checksums within {MANIFEST_WAIT_S} s: {missing}")
        time.sleep(0.05)
    merged = {}
    for part in parts:
        merged.update(json.loads(part.read_text()))
    _write_atomic(folder / MANIFEST, json.dumps({"sha256": dict(sorted(merged.items()))}, indent=1))
    for part in parts:
        part.unlink()
    _write_atomic(root / "latest", tag)
    tags = sorted(p.name for p in root.glob("step_*") if p.is_dir() and p.name <= tag)
    for old in tags[:-keep]:
        shutil.rmtree(root / old, ignore_errors=True)


def _write_checkpoint(
    engine, root: Path, tag: str, step: int, rank_state: dict, weights_files, full_weights: bool
) -> None:
    client_state = {"step": step}
    master_names = _master_names(engine)
    if master_names is not None:
        client_state[MASTER_NAMES] = master_names
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    rank = dist.get_rank()
    torch.save({"step": step, "rng": rng_state(), **rank_state}, root / tag / f"rank{rank}.pt")
    faults.kill_point("checkpoint")
    # Gathering ZeRO partitions and master weights is collective: every rank takes part then;
    # otherwise only rank 0 needs the full copy it writes.
    collective = engine.zero_optimization_stage() == 3 or _trains_master_weights(engine)
    if full_weights and (rank == 0 or collective):
        weights = full_state_dict(engine)
        if rank == 0:
            save_file(weights, str(root / tag / "model.safetensors"))
    if rank == 0:
        for name, state in (weights_files or {}).items():
            save_file(state, str(root / tag / f"{name}.safetensors"))


MANIFEST = "manifest.json"
MANIFEST_PART = "manifest.part.rank"  # one per rank while a save finishes; merged, then removed
MANIFEST_WAIT_S = 1800.0  # rank 0 waits this long for the other ranks' parts
# numpy's RNG state (a uint32 array) is all rank<r>.pt holds beyond tensors and plain data
_NUMPY_RNG_STATE = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _my_files(folder: Path) -> list[Path]:
    """This rank's share of a checkpoint folder's files (each rank reads 1/world of the bytes)."""
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(MANIFEST_PART)
    )
    return files[dist.get_rank() :: dist.get_world_size()]


def damaged_files(folder: Path) -> list[str]:
    """Collective: the files of a checkpoint that are missing, extra or differ from its manifest
    (["manifest.json"] when it has none: the checkpoint never completed)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return [MANIFEST]
    want = json.loads(manifest.read_text())["sha256"]
    found = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    bad = sorted((set(want) - found) | (found - set(want)))
    bad += [
        str(p.relative_to(folder))
        for p in _my_files(folder)
        if str(p.relative_to(folder)) in want and _sha256(p) != want[str(p.relative_to(folder))]
    ]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, bad)
    return sorted({name for part in parts for name in part})


def intact_tag(run_dir) -> str | None:
    """Collective: the newest checkpoint whose files match their manifest, starting at `latest`.
    A damaged or incomplete one is named in a warning and passed over, never silently."""
    root = checkpoint_root(run_dir)
    latest = latest_tag(run_dir)
    if latest is None:
        return None
    tags = sorted((p.name for p in root.glob("step_*") if p.is_dir() and p.name <= latest), reverse=True)
    if latest not in tags:
        log.warning(
            "%s names checkpoint %s, which is missing: falling back to an older one", root / "latest", latest
        )
    for tag in tags:
        bad = damaged_files(root / tag)
        if not bad:
            return tag
        if bad == [MANIFEST] and tag == latest and not (root / tag / MANIFEST).exists():
            log.warning(
                "checkpoint %s has no %s (written by an older mmcontrast): not verified", tag, MANIFEST
            )
            return tag
        log.warning(
            "checkpoint %s is damaged or incomplete (%s): falling back to an older one",
            root / tag,
            ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""),
        )
    raise FileNotFoundError(f"no intact checkpoint in {root}: every one is damaged or incomplete")


UNIVERSAL = "universal"  # checkpoints/universal/<tag>: a resharded copy, removed once loaded


def checkpoint_ranks(run_dir, tag: str) -> int:
    """How many ranks wrote checkpoint `tag`."""
    return len(list((checkpoint_root(run_dir) / tag).glob("rank*.pt")))


def needs_universal(run_dir, tag: str, world: int) -> bool:
    """Whether resuming `tag` on `world` ranks must reshard the optimizer state: ZeRO keeps it
    partitioned by rank in `*optim_states.pt` files; without them it is whole in the model file."""
    folder = checkpoint_root(run_dir) / tag
    return checkpoint_ranks(run_dir, tag) != world and any(folder.glob("*optim_states.pt"))


def make_universal(run_dir, tag: str) -> None:
    """Collective: rank 0 converts checkpoint `tag` into DeepSpeed's universal format (every
    parameter's weights and optimizer state whole, for any number of ranks) under
    `checkpoints/universal/<tag>`. The files were checked against the pickle allow-list before."""
    root = checkpoint_root(run_dir)
    out = root / UNIVERSAL / tag
    if dist.get_rank() == 0 and not (out / "mp_rank_00_model_states.pt").is_file():
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state"]
        command += ["--input_folder", str(root / tag), "--output_folder", str(out)]
        log.info("resharding %s for another number of ranks (DeepSpeed's ds_to_universal)", tag)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(out, ignore_errors=True)
            raise RuntimeError(
                f"ds_to_universal could not convert {root / tag}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
    dist.barrier()


def load_checkpoint(engine, run_dir, tag: str | None = None, universal: bool = False) -> dict:
    """Restore model/optimizer/scheduler; returns this rank's saved state (step, rng, data, and
    "tag"). A rank the checkpoint's run did not have (more ranks now) gets only step and tag.
    universal: load the make_universal() copy (an engine built with load_universal).

    RNG states are left to the caller: it restores them once the data loader has started, since
    starting a DataLoader draws from torch's RNG.
    """
    root = checkpoint_root(run_dir)
    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint to resume from in {root} (no 'latest' marker)")
    load_path, client_state = engine.load_checkpoint(str(root / UNIVERSAL if universal else root), tag=tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    if universal:  # the universal format holds parameters only: buffers (BatchNorm) come from the full copy
        weights = checkpoint_weights(root / tag)
        with torch.no_grad():
            for name, buffer in engine.module.named_buffers():
                if name in weights:
                    buffer.copy_(weights[name].to(buffer.dtype))
        dist.barrier()  # every rank has loaded the resharded copy: it is not needed again
        if dist.get_rank() == 0:
            shutil.rmtree(root / UNIVERSAL / tag, ignore_errors=True)
    state_file = root / tag / f"rank{dist.get_rank()}.pt"
    if state_file.is_file():
        state = _load_rank_file(state_file)
    else:
        state = {"step": int(client_state["step"])}
    state["tag"] = tag
    return state


def _load_rank_file(path: Path) -> dict:
    with torch.serialization.safe_globals(_NUMPY_RNG_STATE):
        return torch.load(path, weights_only=True)


def load_data_positions(run_dir, tag: str) -> list[dict]:
    """Every rank's data position in checkpoint `tag`, for a resume on another layout."""
    files = sorted((checkpoint_root(run_dir) / tag).glob("rank*.pt"))
    return [_load_rank_file(path)["data"] for path in files]


def load_weights_file(run_dir, tag: str, name: str) -> dict[str, torch.Tensor]:
    """A <tag>/<name>.safetensors written through save_checkpoint(weights_files=...)."""
    from safetensors.torch import load_file

    path = checkpoint_root(run_dir) / tag / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint was written without {name!r}")
    return load_file(str(path))
