"""Guards against dirty data and foreign files: NaN audio, repeated keys in a shard, exports that
ask to run code, and a wandb run that survives a resume."""

import io
import json
import os

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from mmcontrast.config import load_config
from mmcontrast.data.audio import AudioDecodeError, decode_audio
from mmcontrast.data.tar_events import tar_events
from mmcontrast.export import ExportError, export_run, load_exported
from tests.export_helpers import DEMO_CONFIG, make_run_dir
from tests.tolerances import same_number


def _wav(wave) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.asarray(wave, dtype=np.float32), 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def test_non_finite_audio_is_refused():
    assert decode_audio(_wav(np.zeros(800)), 16000, 800).abs().max() == 0
    for bad in (np.nan, np.inf):
        wave = np.zeros(800)
        wave[17] = bad
        with pytest.raises(AudioDecodeError, match="NaN or infinite"):
            decode_audio(_wav(wave), 16000, 800)


def test_nan_clip_in_a_shard_is_a_counted_skip(tmp_path):
    import open_clip

    from tests.test_pipeline import cfg, loader

    nan = np.zeros(16000)
    nan[100] = np.nan
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        for i in range(4):
            wave = nan if i == 2 else np.sin(np.arange(16000) / (5 + i))
            sink.write({"__key__": f"k{i}", "txt": b"a sound", "wav": _wav(wave)})
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    c = cfg(fields={"text": "txt", "audio": "wav"}, batch_size=1, workers=0)
    ld = loader(str(tmp_path / "s.tar"), c, tok, None, train=False)
    keys = [b["__key__"][0] for b in ld]
    assert keys == ["k0", "k1", "k3"] and ld.skipped == {"bad_audio": 1}


def _members(path, members):
    import tarfile

    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_repeated_keys_in_a_shard_are_counted_skips(tmp_path):
    path = tmp_path / "dup.tar"
    _members(
        path,
        [
            ("a.txt", b"first"),
            ("a.png", b"image of a"),
            ("a.png", b"image of another sample"),  # repeated inside the sample
            ("b.txt", b"bee"),
            ("c.txt", b"sea"),
            ("b.txt", b"bee again"),  # the key comes back after another sample
            ("d.txt", b"dee"),
        ],
    )
    events = list(tar_events(str(path)))
    samples = [e["__key__"] for e in events if isinstance(e, dict)]
    skips = [(e.reason, e.key) for e in events if not isinstance(e, dict)]
    assert samples == ["b", "c", "d"]
    assert skips == [("duplicate_key", "a"), ("duplicate_key", "b")]
    assert next(e for e in events if isinstance(e, dict) and e["__key__"] == "b")["txt"] == b"bee"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    make_run_dir(root / "run")
    return export_run(root / "run", root / "export")


def _edited_copy(export, tmp_path, edit):
    import shutil

    folder = tmp_path / "foreign"
    shutil.copytree(export, folder)
    config = json.loads((folder / "open_clip_config.json").read_text())
    edit(config["model_cfg"])
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    # what a malicious folder would carry: a tokenizer whose Python leaves a marker when run
    marker = tmp_path / "ran"
    (folder / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}})
    )
    return folder, marker


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["text_cfg"].update(hf_tokenizer_name="gpt2", tokenizer_kwargs={"trust_remote_code": True}),
         r"text_cfg\.tokenizer_kwargs\.trust_remote_code"),
        (lambda c: c["text_cfg"].update(hf_tokenizer_name="."), r"text_cfg\.hf_tokenizer_name '\.' points into"),
    ],
    ids=["trust_remote_code", "tokenizer_inside_folder"],
)  # fmt: skip
def test_an_export_that_asks_to_run_code_is_refused(export, tmp_path, edit, message):
    assert load_exported(export).embed_dim > 0  # the untouched export loads
    folder, marker = _edited_copy(export, tmp_path, edit)
    with pytest.raises(ExportError, match=message):
        load_exported(folder)
    assert not marker.exists()


def test_wandb_run_id_survives_a_resume(tmp_path, monkeypatch):
    from mmcontrast.train.metrics import MetricsLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(DEMO_CONFIG, [f"run.dir={tmp_path}", "run.wandb=offline"])
    for _ in range(2):  # the first start, then a resume in the same run directory
        logger = MetricsLogger(tmp_path, cfg)
        logger.log({"step": 1, "loss": 1.0})
        logger.close()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    runs = sorted(os.listdir(tmp_path / "wandb"))
    runs = [r for r in runs if r.startswith("offline-run-")]
    assert len(runs) == 2 and all(r.split("-")[3] == run_id for r in runs), runs  # offline-run-TIME-ID[-n]


def _snapshot(folder):
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
def test_bad_resumes_are_refused_before_any_file_changes(repo_root, tmp_path):
    import subprocess
    import sys

    from mmcontrast.data.demo import write_demo_world
    from tests.test_train_e2e import TINY

    world = write_demo_world(tmp_path / "world", n_train=32, n_val=0, seed=1, samples_per_shard=16)
    run = tmp_path / "run"
    base = [*TINY, f"data.train={world['urls']['train']}", "eval.benchmarks=[]", "data.workers=1"]

    def train(*extra):
        cmd = [
            sys.executable,
            "-m",
            "mmcontrast.cli",
            "train",
            str(repo_root / "configs/demo.yaml"),
            *base,
            *extra,
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    assert train(f"run.dir={run}", "train.steps=2", "train.checkpoint_every=2").returncode == 0
    before = _snapshot(run)
    changed = train(
        f"run.dir={run}", "train.steps=4", "model.audio.n_mels=16", "data.batch_size=4", "--resume"
    )
    assert changed.returncode == 2
    assert "model: the run has" in changed.stderr and "data.batch_size: the run has 8" in changed.stderr
    assert _snapshot(run) == before  # config.yaml, metrics and checkpoints untouched
    missing = train(f"run.dir={tmp_path / 'empty'}", "train.steps=2", "--resume")
    assert missing.returncode == 2 and "holds no checkpoint" in missing.stderr
    assert not (tmp_path / "empty").exists()
    fresh = train(f"run.dir={tmp_path / 'fresh'}", "train.steps=1", "--resume-if-exists")
    assert fresh.returncode == 0, fresh.stderr
    history = [
        json.loads(line) for line in (tmp_path / "fresh" / "config_history.jsonl").read_text().splitlines()
    ]
    assert [h["resumed_from"] for h in history] == [None]


def test_metrics_after_the_resumed_step_are_dropped_and_a_cut_line_repaired(tmp_path, caplog):
    from mmcontrast.train.metrics import drop_records_after

    path = tmp_path / "metrics.jsonl"
    records = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(records) + '\n{"step": 4, "lo')  # killed mid-write
    drop_records_after(tmp_path, 2)
    assert path.read_text() == "".join(r + "\n" for r in records[:2])
    assert "metrics.jsonl: dropping its damaged last line" in caplog.text
    path.write_text(records[0] + "\n{broken\n" + records[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl line 2 is not a JSON record"):
        drop_records_after(tmp_path, 5)


@pytest.mark.slow
def test_a_flipped_byte_falls_back_to_the_newest_intact_checkpoint(repo_root, tmp_path):
    import subprocess
    import sys

    from mmcontrast.data.demo import write_demo_world
    from tests.test_train_e2e import TINY, _train_losses

    world = write_demo_world(tmp_path / "world", n_train=64, n_val=0, seed=1, samples_per_shard=16)
    base = [*TINY, f"data.train={world['urls']['train']}", "eval.benchmarks=[]", "data.workers=1"]
    base += ["train.checkpoint_every=2", "train.keep_checkpoints=3"]

    def train(run, steps, *extra):
        cmd = [sys.executable, "-m", "mmcontrast.cli", "train", str(repo_root / "configs/demo.yaml"), *base]
        cmd += [f"run.dir={run}", f"train.steps={steps}", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    assert train(tmp_path / "reference", 6).returncode == 0
    run = tmp_path / "run"
    assert train(run, 4).returncode == 0
    manifest = json.loads((run / "checkpoints" / "step_0000004" / "manifest.json").read_text())["sha256"]
    assert "rank0.pt" in manifest and "model.safetensors" in manifest
    (victim,) = [name for name in manifest if name.endswith("model_states.pt")]  # DeepSpeed's own file
    path = run / "checkpoints" / "step_0000004" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    resumed = train(run, 6, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"step_0000004 is damaged or incomplete ({victim})" in resumed.stderr
    assert "resumed from step_0000002 at step 2" in resumed.stderr
    ref, res = _train_losses(tmp_path / "reference"), _train_losses(run)
    assert sorted(res) == list(range(1, 7))
    assert all(same_number(res[s]["loss"], ref[s]["loss"]) for s in range(3, 7))


class _Payload:
    """Pickles to a call of os.system: what a poisoned checkpoint file would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def small_run(repo_root, tmp_path_factory):
    import subprocess
    import sys

    from mmcontrast.data.demo import write_demo_world
    from tests.test_train_e2e import TINY

    root = tmp_path_factory.mktemp("payload")
    world = write_demo_world(root / "world", n_train=32, n_val=0, seed=1, samples_per_shard=16)
    args = [*TINY, f"data.train={world['urls']['train']}", "eval.benchmarks=[]", "data.workers=1"]
    args += ["train.checkpoint_every=2"]

    def train(run, steps, *extra):
        cmd = [sys.executable, "-m", "mmcontrast.cli", "train", str(repo_root / "configs/demo.yaml"), *args]
        return subprocess.run(
            [*cmd, f"run.dir={run}", f"train.steps={steps}", *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )

    assert train(root / "run", 2).returncode == 0
    return root / "run", train


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["rank0.pt", "model_states.pt"])
def test_a_pickle_payload_in_a_checkpoint_does_not_run(small_run, tmp_path, victim):
    import shutil

    import torch

    run, train = small_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (path,) = (copy / "checkpoints" / "step_0000002").glob(f"*{victim}")
    marker = tmp_path / "payload-ran"
    torch.save({"state": _Payload(marker)}, path)
    resumed = train(copy, 4, "--resume")
    assert resumed.returncode == 1 and "is damaged or incomplete" in resumed.stderr  # the checksum sees it
    # an attacker who also rewrites the manifest meets the pickle check
    import hashlib

    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sha256"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    resumed = train(copy, 4, "--resume")
    assert resumed.returncode == 2
    assert f"{path} names posix.system" in resumed.stderr
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: a full unpickler runs it
    assert marker.exists()


@pytest.mark.slow
def test_ctrl_c_and_sigterm_to_the_process_group_checkpoint_and_resume_exactly(repo_root, tmp_path):
    """The signal reaches the trainer and its data-loader workers alike (as Ctrl-C in a terminal
    and `kill -TERM -PGID` do): the run stops after a step with a checkpoint, exits 0, and
    `--resume` continues with the uninterrupted run's losses."""
    import signal
    import subprocess
    import sys
    import time

    from mmcontrast.data.demo import write_demo_world
    from tests.test_train_e2e import TINY, _train_losses

    world = write_demo_world(tmp_path / "world", n_train=64, n_val=0, seed=1, samples_per_shard=16)
    base = [*TINY, f"data.train={world['urls']['train']}", "eval.benchmarks=[]", "data.workers=2"]
    base += ["train.steps=12", "train.checkpoint_every=1000"]

    def command(run, *extra):
        return [sys.executable, "-m", "mmcontrast.cli", "train", str(repo_root / "configs/demo.yaml"), *base, f"run.dir={run}", *extra]  # fmt: skip

    subprocess.run(command(tmp_path / "reference"), check=True, capture_output=True, timeout=300)
    reference = _train_losses(tmp_path / "reference")
    for signum in (signal.SIGINT, signal.SIGTERM):
        run = tmp_path / signum.name
        proc = subprocess.Popen(command(run), start_new_session=True, stderr=subprocess.PIPE, text=True)
        metrics = run / "metrics.jsonl"
        while proc.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
            time.sleep(0.1)
        os.killpg(proc.pid, signum)  # the whole group: trainer and workers
        err = proc.communicate(timeout=120)[1]
        assert proc.returncode == 0, err[-2000:]
        stopped = json.loads((run / "preempted.json").read_text())
        assert stopped["signal"] == signum.name and 3 <= stopped["step"] < 12
        subprocess.run(command(run, "--resume"), check=True, capture_output=True, timeout=300)
        resumed = _train_losses(run)
        assert sorted(resumed) == list(range(1, 13))
        assert all(same_number(resumed[s]["loss"], reference[s]["loss"]) for s in resumed), signum.name


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(repo_root, tmp_path):
    """The checkpoints folder is a 150 MiB tmpfs: the step-2 checkpoint (~101 MiB) fits, step 4's
    does not. torch's writer alone would say `basic_ios::clear: iostream error`."""
    import subprocess
    import sys

    from mmcontrast.data.demo import write_demo_world
    from tests.test_train_e2e import TINY

    world = write_demo_world(tmp_path / "world", n_train=64, n_val=0, seed=1, samples_per_shard=16)
    run = tmp_path / "run"
    mount = run / "checkpoints"
    mount.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(mount)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        base = [*TINY, f"data.train={world['urls']['train']}", "eval.benchmarks=[]", "data.workers=1"]
        base += [f"run.dir={run}", "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=2"]
        cmd = [sys.executable, "-m", "mmcontrast.cli", "train", str(repo_root / "configs/demo.yaml"), *base]
        full = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert full.returncode == 1, full.stderr[-3000:]
        assert f"writing checkpoint step_0000004 in {mount} failed" in full.stderr
        assert "No space left on device" in full.stderr
        assert sorted(p.name for p in mount.iterdir()) == ["latest", "step_0000002"]  # no partial folder
        assert (mount / "latest").read_text().strip() == "step_0000002"
        # with room again, --resume continues from the intact checkpoint
        subprocess.run(["mount", "-o", "remount,size=400m", str(mount)], check=True)
        resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resumed from step_0000002 at step 2" in resumed.stderr
        assert (mount / "latest").read_text().strip() == "step_0000004"
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
