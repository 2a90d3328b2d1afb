"""Typed run configuration: dataclasses loaded from YAML plus `a.b=value` overrides.

Every key is checked before any work starts; a bad key or value raises ConfigError naming the
key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODALITIES = ("image", "text", "audio")


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


@dataclass
class RunConfig:
    dir: str = "runs/demo"
    seed: int = 0
    wandb: str = "disabled"  # online | offline | disabled
    wandb_project: str = "mmcontrast"
    name: str = ""


@dataclass
class DataConfig:
    train: str = ""  # brace-expanded URLs; several sources joined with "::"
    train_weights: list[float] = field(default_factory=list)  # one weight per "::" source
    resampled: bool = False
    shuffle_buffer: int = 1000
    # shard index for a resume that reads no consumed shard; "": RUN_DIR/shard_index, filled as
    # shards are read (or written beforehand by `mmcontrast data index URLS --out DIR`)
    index_dir: str = ""
    batch_size: int = 64
    workers: int = 2
    # modality -> ";"-separated shard fields tried in order; text also takes JSON keys
    # ("txt;json:caption;json:text"), whose value is a caption or a list of captions
    fields: dict[str, str] = field(
        default_factory=lambda: {"image": "png;jpg;jpeg;webp", "text": "txt", "audio": "flac;wav;mp3"}
    )
    # images whose header claims more pixels are skipped undecoded (PIL's own bomb limit; 0: off)
    max_image_pixels: int = 89_478_485
    audio_sample_rate: int = 16000
    audio_seconds: float = 1.0
    # hard-negative captions per sample: "" (none), "shard" (a neg.json list in the sample),
    # "demo" (from the demo world's json metadata) or "rules" (rewritten from the caption)
    negatives: str = ""
    negatives_per_sample: int = 2


@dataclass
class AudioTowerConfig:
    backbone: str = "resnet10t"  # any timm model name
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 64
    # starting weights: an mmcontrast export folder (its audio_tower.safetensors) or a timm
    # checkpoint file of the backbone (classifier dropped, RGB stem summed to one channel)
    pretrained: str = ""


@dataclass
class ModelConfig:
    # open_clip model name (open_clip.list_models()) or an inline open_clip model config dict
    clip: Any = "ViT-B-32"
    audio: AudioTowerConfig | None = field(default_factory=AudioTowerConfig)
    init_logit_scale: float = 2.6592  # ln(1/0.07), as CLIP
    init_logit_bias: float | None = None  # a learnable logit bias (SigLIP: -10, with scale ln 10)
    # open_clip's training augmentation (AugmentationCfg keys), e.g. {scale: [0.9, 1.0]}
    image_augment: dict[str, Any] = field(default_factory=dict)
    # starting image/text weights (local files only): an open_clip checkpoint (.pt, .bin,
    # .safetensors, as open_clip_train writes them) or a local-dir folder (an mmcontrast export);
    # "" with model.clip "local-dir:DIR" loads that folder's weights. Only a fresh run loads them.
    pretrained: str = ""
    # refuse starting weights with missing, unexpected or misshapen keys; false loads what fits
    # and lists the rest
    pretrained_strict: bool = True
    # LiT: {image: true, text: {unlocked_layers: 2}, audio: {unlocked_groups: 1}}; a tower
    # locked whole runs in eval mode without autograd (see model/tower_groups.py)
    lock: dict[str, Any] = field(default_factory=dict)
    # FLIP: the fraction of image patches dropped in training (ViT image towers)
    patch_dropout: float = 0.0


@dataclass
class EmaConfig:
    decay: float = 0.9998
    every: int = 1  # optimizer steps between updates


@dataclass
class TermConfig:
    name: str = "info_nce"  # a registered objective term
    weight: float = 1.0
    # "all" pairs of the modalities, or "anchor:<modality>" (every modality against one), or an
    # explicit list of [a, b] pairs
    pairs: Any = "all"
    # keyword options of the term's builder, e.g. {label_smoothing: 0.1, tile: 4096}
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    terms: list[TermConfig] = field(default_factory=lambda: [TermConfig()])


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup: int = 100
    weight_decay: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float = 1.0
    # fp32 | bf16 (DeepSpeed: bf16 weights, fp32 masters, gradients reduced in fp32) |
    # amp_bf16 (fp32 weights, the forward under bf16 autocast, as open_clip's amp_bf16) |
    # fp16 (GPU only: dynamic loss scaling)
    precision: str = "fp32"
    # on a GPU: TF32 matmuls and convolutions, cuDNN autotuning (no effect on CPU)
    tf32: bool = True
    # torch.compile each tower (inductor; on CPU too); the checkpoint's keys do not change
    compile: bool = False
    # the process group's collective timeout; a rank that stops answering fails the job after it
    dist_timeout_minutes: float = 30.0
    zero_stage: int = 0
    # micro-batches per step: each rank's data.batch_size samples are encoded in this many
    # pieces whose negatives are still the whole global batch (GradCache, RNG replayed)
    accumulation: int = 1
    # recompute tower activations in backward (open_clip and timm towers' own checkpointing)
    activation_checkpointing: bool = False
    # a DeepSpeed JSON merged into the generated one (e.g. configs/deepspeed/zero3.json); keys
    # the run config sets must agree with it
    deepspeed: str = ""
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    # checkpoints that also hold the full fp32 weights (model.safetensors): the final one, and
    # every this many steps (0: no others; an export rebuilds them from DeepSpeed's files)
    weights_every: int = 0
    # learning-rate multipliers per tower ({image: 0.1}; 1 where absent) and layer-wise decay
    # per tower ({image: 0.75}: each layer group below the top one takes 0.75x the next one's);
    # the schedule scales every group
    lr_scale: dict[str, float] = field(default_factory=dict)
    layer_decay: dict[str, float] = field(default_factory=dict)
    # an exponential moving average of the weights ({decay: 0.9998, every: 1}), checkpointed,
    # evaluated beside the raw weights (val_ema/...) and exported with `mmcontrast export --ema`
    ema: EmaConfig | None = None
    # a step with a non-finite loss or gradient is skipped on every rank; this many in a row
    # stop the run (no checkpoint is written from that state)
    max_nonfinite_steps: int = 10
    progress: bool = True


@dataclass
class EvalConfig:
    # benchmark folders (clip_benchmark's wds layout, extended to audio; see mmcontrast.data.benchmark)
    # evaluated every train.eval_every steps and at the end, the work split over every rank
    benchmarks: list[str] = field(default_factory=list)
    batch_size: int = 256
    # CoCa models: captions for captioning benchmarks with this strategy ("" skips them)
    caption_strategy: str = "greedy"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def modalities(self) -> list[str]:
        """Modalities this run trains, in canonical order."""
        return [m for m in MODALITIES if m in self.data.fields]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- building from plain data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


_UNIONS = (typing.Union, getattr(__import__("types"), "UnionType", None))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in _UNIONS:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {_type_name(tp)} keys, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (Any, Any)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "3e-4" (no dot) as a string
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


# Keys that were replaced: a sentence on what to use instead.
MOVED_KEYS = {
    "data.val": "evaluation now runs on benchmark folders: set eval.benchmarks to a list of them "
    "(`mmcontrast data benchmark --data VAL_URLS ...` writes one from held-out shards)",
    "eval.templates": "templates now live in each benchmark folder's zeroshot_classification_templates.txt",
}


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if full in MOVED_KEYS:
            raise ConfigError(f"'{full}' is no longer a config key: {MOVED_KEYS[full]}")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}; allowed keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


# ---------------------------------------------------------------- validation


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: bad value {value!r}; allowed: {allowed}")


def validate(cfg: Config) -> Config:
    """Range and consistency checks that types alone cannot express."""
    from mmcontrast.data.fields import check_field_specs  # late: mmcontrast.data imports config
    from mmcontrast.losses import TERMS  # late import: keeps config importable alone

    r, d, t = cfg.run, cfg.data, cfg.train
    _check(r.wandb in ("online", "offline", "disabled"), "run.wandb", r.wandb, "online, offline, disabled")
    _check(bool(r.dir), "run.dir", r.dir, "a non-empty path")
    _check(t.steps >= 1, "train.steps", t.steps, "an integer >= 1")
    _check(t.lr > 0, "train.lr", t.lr, "a number > 0")
    _check(0 <= t.min_lr <= t.lr, "train.min_lr", t.min_lr, f"0 <= min_lr <= train.lr ({t.lr})")
    _check(t.warmup >= 0, "train.warmup", t.warmup, "an integer >= 0")
    _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "a number >= 0")
    _check(
        len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
        "train.betas",
        t.betas,
        "two numbers in [0, 1)",
    )
    _check(t.eps > 0, "train.eps", t.eps, "a number > 0")
    _check(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "a number >= 0 (0 disables)")
    _check(
        t.precision in ("fp32", "bf16", "amp_bf16", "fp16"),
        "train.precision",
        t.precision,
        "fp32, bf16, amp_bf16, fp16",
    )
    _check(t.dist_timeout_minutes > 0, "train.dist_timeout_minutes", t.dist_timeout_minutes, "a number > 0")
    _check(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", t.zero_stage, "0, 1, 2, 3")
    _check(t.accumulation >= 1, "train.accumulation", t.accumulation, "an integer >= 1")
    _check(
        d.batch_size % t.accumulation == 0,
        "train.accumulation",
        t.accumulation,
        f"a divisor of data.batch_size ({d.batch_size}): each micro-batch holds batch_size / accumulation",
    )
    _check(t.log_every >= 1, "train.log_every", t.log_every, "an integer >= 1")
    _check(t.eval_every >= 0, "train.eval_every", t.eval_every, "an integer >= 0")
    _check(t.checkpoint_every >= 0, "train.checkpoint_every", t.checkpoint_every, "an integer >= 0")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, "an integer >= 1")
    _check(t.weights_every >= 0, "train.weights_every", t.weights_every, "an integer >= 0")
    _check(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", t.max_nonfinite_steps, "an integer >= 1")
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "an integer >= 1")
    _check(d.workers >= 0, "data.workers", d.workers, "an integer >= 0")
    _check(d.shuffle_buffer >= 0, "data.shuffle_buffer", d.shuffle_buffer, "an integer >= 0")
    _check(d.audio_sample_rate > 0, "data.audio_sample_rate", d.audio_sample_rate, "a positive integer")
    _check(d.audio_seconds > 0, "data.audio_seconds", d.audio_seconds, "a number > 0")
    _check(
        d.negatives in ("", "shard", "demo", "rules"), "data.negatives", d.negatives, "'', shard, demo, rules"
    )
    _check(
        d.negatives_per_sample >= 1, "data.negatives_per_sample", d.negatives_per_sample, "an integer >= 1"
    )
    for m in d.fields:
        _check(m in MODALITIES, f"data.fields.{m}", m, ", ".join(MODALITIES))
    try:
        check_field_specs(d.fields)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _check(
        d.max_image_pixels >= 0, "data.max_image_pixels", d.max_image_pixels, "an integer >= 0 (0: no limit)"
    )
    _check(len(cfg.modalities) >= 2, "data.fields", list(d.fields), "at least two modalities")
    n_sources = len(d.train.split("::")) if d.train else 0
    if d.train_weights:
        _check(
            len(d.train_weights) == n_sources and all(w > 0 for w in d.train_weights),
            "data.train_weights",
            d.train_weights,
            f"{n_sources} positive weights, one per '::'-separated source in data.train",
        )
    if "audio" in cfg.modalities:
        _check(
            cfg.model.audio is not None,
            "model.audio",
            None,
            "an audio tower config when data.fields has audio",
        )
    if cfg.model.audio is not None:
        a = cfg.model.audio
        _check(a.n_mels >= 8, "model.audio.n_mels", a.n_mels, "an integer >= 8")
        _check(0 < a.hop_length <= a.n_fft, "model.audio.hop_length", a.hop_length, f"1..n_fft ({a.n_fft})")
    _check(
        isinstance(cfg.model.clip, (str, dict)),
        "model.clip",
        cfg.model.clip,
        "an open_clip model name or config dict",
    )
    _validate_starting_weights(cfg)
    _check(cfg.eval.batch_size >= 1, "eval.batch_size", cfg.eval.batch_size, "an integer >= 1")
    names = [Path(b).name for b in cfg.eval.benchmarks]
    _check(
        len(set(names)) == len(names) and all(names),
        "eval.benchmarks",
        cfg.eval.benchmarks,
        "benchmark folders with distinct names (the folder name prefixes the metric keys)",
    )
    _check(
        cfg.eval.caption_strategy in ("", "greedy", "top_k", "top_p", "beam"),
        "eval.caption_strategy",
        cfg.eval.caption_strategy,
        "greedy, top_k, top_p, beam, or '' (no caption evaluation)",
    )
    if cfg.model.image_augment:
        import dataclasses

        from open_clip.transform import AugmentationCfg

        allowed = [f.name for f in dataclasses.fields(AugmentationCfg)]
        for key in cfg.model.image_augment:
            _check(
                key in allowed, f"model.image_augment.{key}", cfg.model.image_augment[key], ", ".join(allowed)
            )
    if t.deepspeed:
        from mmcontrast.train.ds_config import deepspeed_config

        deepspeed_config(cfg)  # refuses conflicts and misplaced keys before any work
    _check(len(cfg.loss.terms) >= 1, "loss.terms", cfg.loss.terms, "at least one objective term")
    for i, term in enumerate(cfg.loss.terms):
        _check(term.name in TERMS, f"loss.terms[{i}].name", term.name, ", ".join(sorted(TERMS)))
        _check(term.weight >= 0, f"loss.terms[{i}].weight", term.weight, "a number >= 0")
        try:
            resolve_pairs(term.pairs, cfg.modalities)
        except ConfigError as exc:
            raise ConfigError(f"loss.terms[{i}].pairs: {exc}") from None
        accepted = [p for p in inspect.signature(TERMS[term.name]).parameters if p != "pairs"]
        for key in term.options:
            _check(
                key in accepted,
                f"loss.terms[{i}].options.{key}",
                term.options[key],
                f"options of {term.name}: {', '.join(accepted) or 'none'}",
            )
        if term.name == "gram" and "anchor" in term.options:
            _check(
                term.options["anchor"] in cfg.modalities,
                f"loss.terms[{i}].options.anchor",
                term.options["anchor"],
                ", ".join(cfg.modalities),
            )
        if term.name == "symile" and "negatives" in term.options:
            _check(
                term.options["negatives"] in ("n", "n_squared"),
                f"loss.terms[{i}].options.negatives",
                term.options["negatives"],
                "n, n_squared",
            )
        if term.name == "caption":
            _check(
                isinstance(cfg.model.clip, dict)
                and "multimodal_cfg" in cfg.model.clip
                or isinstance(cfg.model.clip, str)
                and cfg.model.clip.startswith("coca"),
                "model.clip",
                cfg.model.clip if isinstance(cfg.model.clip, str) else "(inline config)",
                "a CoCa model (an open_clip coca_* name or a config with multimodal_cfg) for the caption term",
            )
            _check(
                {"image", "text"} <= set(cfg.modalities)
                and (term.pairs == "all" or resolve_pairs(term.pairs, cfg.modalities) == [("image", "text")]),
                f"loss.terms[{i}].pairs",
                term.pairs,
                "all or [[image, text]], with image and text in data.fields (captions are image -> text)",
            )
        if term.name in ("negclip", "degla"):
            _check(
                bool(d.negatives),
                "data.negatives",
                d.negatives,
                f"shard, demo or rules: the {term.name} term needs negative captions",
            )
        if term.name == "degla":
            _check(
                t.zero_stage < 3,
                "train.zero_stage",
                t.zero_stage,
                "0, 1 or 2 with a degla term (its EMA teacher copies full, unpartitioned weights)",
            )
        if term.name == "siglip":
            _check(
                cfg.model.init_logit_bias is not None,
                "model.init_logit_bias",
                None,
                "a number (e.g. -10) when a siglip term is configured",
            )
    return cfg


def _validate_starting_weights(cfg: Config) -> None:
    """model.pretrained / lock / patch_dropout, train.lr_scale / layer_decay / ema."""
    from mmcontrast.model.tower_groups import LOCK_OPTIONS  # late: the model imports torch

    m, t = cfg.model, cfg.train
    clip = m.clip if isinstance(m.clip, str) else ""
    _check(
        not clip.startswith("hf-hub:"),
        "model.clip",
        clip,
        "an open_clip model name, a config dict or local-dir:FOLDER (nothing is downloaded; give "
        "downloaded weights as model.pretrained)",
    )
    for key, spec in (
        ("model.pretrained", m.pretrained),
        ("model.audio.pretrained", m.audio and m.audio.pretrained),
    ):
        if spec:
            path = Path(spec.removeprefix("local-dir:"))
            _check(path.exists(), key, spec, "an existing local file or folder (nothing is downloaded)")
    if m.audio is not None:
        _check(
            "pretrained" not in m.audio.backbone_kwargs,
            "model.audio.backbone_kwargs.pretrained",
            m.audio.backbone_kwargs.get("pretrained"),
            "no hub download: give a local timm checkpoint file as model.audio.pretrained",
        )
    _check(0 <= m.patch_dropout < 1, "model.patch_dropout", m.patch_dropout, "0 <= p < 1")
    for modality, value in m.lock.items():
        _check(modality in LOCK_OPTIONS, f"model.lock.{modality}", value, ", ".join(LOCK_OPTIONS))
        options = LOCK_OPTIONS[modality]
        allowed = f"true, false or {{{', '.join(options)}}}"
        _check(isinstance(value, (bool, dict)), f"model.lock.{modality}", value, allowed)
        for key, option in value.items() if isinstance(value, dict) else ():
            _check(key in options, f"model.lock.{modality}.{key}", option, allowed)
            good = isinstance(option, bool) if options[key] is bool else type(option) is int and option >= 0
            _check(
                good,
                f"model.lock.{modality}.{key}",
                option,
                "true or false" if options[key] is bool else "an integer >= 0",
            )
    for key, table, low, high in (
        ("train.lr_scale", t.lr_scale, 0, None),
        ("train.layer_decay", t.layer_decay, 0, 1),
    ):
        for modality, value in table.items():
            _check(modality in MODALITIES, f"{key}.{modality}", value, ", ".join(MODALITIES))
            ok = value > low and (high is None or value <= high)
            _check(ok, f"{key}.{modality}", value, f"a number > {low}" + (f" and <= {high}" if high else ""))
    if t.ema is not None:
        _check(0 < t.ema.decay < 1, "train.ema.decay", t.ema.decay, "0 < decay < 1")
        _check(t.ema.every >= 1, "train.ema.every", t.ema.every, "an integer >= 1")
        _check(
            t.zero_stage < 3,
            "train.zero_stage",
            t.zero_stage,
            "0, 1 or 2 with train.ema (the average copies full, unpartitioned weights)",
        )


def _is_coca(clip_spec) -> bool:
    from mmcontrast.model.coca import is_coca_config
    from mmcontrast.model.multimodal import resolve_clip_config

    try:
        return is_coca_config(resolve_clip_config(clip_spec))
    except ValueError:
        return False


def resolve_pairs(spec: Any, modalities: list[str]) -> list[tuple[str, str]]:
    """Ordered modality pairs of a pair spec; see resolve_weighted_pairs for the spec."""
    return [(a, b) for a, b, _ in resolve_weighted_pairs(spec, modalities)]


def resolve_weighted_pairs(spec: Any, modalities: list[str]) -> list[tuple[str, str, float]]:
    """A pair spec -> [(a, b, weight)]: "all", "anchor:<modality>" (ImageBind-style, every
    modality against the anchor) or a list of [a, b] / [a, b, weight] entries."""
    if spec == "all":
        return [(a, b, 1.0) for i, a in enumerate(modalities) for b in modalities[i + 1 :]]
    if isinstance(spec, str) and spec.startswith("anchor:"):
        anchor = spec.split(":", 1)[1]
        if anchor not in modalities:
            raise ConfigError(f"bad value {spec!r}; the anchor must be one of {modalities}")
        return [(anchor, m, 1.0) for m in modalities if m != anchor]
    if isinstance(spec, list) and spec:
        pairs, seen = [], set()
        for p in spec:
            ok = isinstance(p, (list, tuple)) and len(p) in (2, 3) and p[0] != p[1]
            ok = ok and all(m in modalities for m in p[:2])
            ok = ok and (
                len(p) == 2 or (isinstance(p[2], (int, float)) and not isinstance(p[2], bool) and p[2] >= 0)
            )
            if not ok:
                raise ConfigError(
                    f"bad pair {p!r}; each entry is [a, b] or [a, b, weight >= 0] with a != b in {modalities}"
                )
            if frozenset(p[:2]) in seen:
                raise ConfigError(f"pair {p[:2]!r} is listed twice")
            seen.add(frozenset(p[:2]))
            pairs.append((p[0], p[1], float(p[2]) if len(p) == 3 else 1.0))
        return pairs
    raise ConfigError(
        f"bad value {spec!r}; allowed: 'all', 'anchor:<modality>' or a list of [a, b] or [a, b, weight]"
    )


# ---------------------------------------------------------------- loading


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form a.b=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def _set_nested(tree: dict, path: list[str], value: Any) -> None:
    """Set one key, leaving its siblings; None removes an entry of a mapping-valued field."""
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    if value is None and not _in_dataclass(path):
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


def _in_dataclass(path: list[str]) -> bool:
    """Whether the key at `path` is a field of a config section (`model.audio`,
    `eval.caption_strategy`), not an entry of a mapping-valued field (`data.fields.audio`)."""
    tp: Any = Config
    for part in path[:-1]:
        tp = _strip_optional(tp)
        if not dataclasses.is_dataclass(tp):
            return False
        tp = typing.get_type_hints(tp).get(part)
        if tp is None:  # an unknown key: building the config names it
            return True
    return dataclasses.is_dataclass(_strip_optional(tp))


def _strip_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in _UNIONS and len(args) == 1 else tp


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = (
            _deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def _read_tree(path: Path, seen: tuple = ()) -> dict:
    """A YAML file as a dict; `base: other.yaml` (relative to this file) is loaded first and
    this file's keys override it, section by section."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a path to another YAML config, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path}: base: no such file {base_path}")
    return _deep_merge(_read_tree(base_path, (*seen, path.resolve())), tree)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML run config (following `base:`), apply `a.b=value` overrides and validate.

    Overrides apply to the resolved config (YAML over defaults), so `data.fields.image=jpg`
    changes that entry only; `data.fields.audio=null` removes one, `data.fields={...}` replaces all.
    """
    tree: dict = {}
    if path is not None:
        tree = _read_tree(Path(path))
    if overrides:
        tree = _build(Config, tree, "").to_dict()
        for item in overrides:
            keys, value = _parse_override(item)
            _set_nested(tree, keys, value)
    return validate(_build(Config, tree, ""))


def config_from_dict(tree: dict) -> Config:
    return validate(_build(Config, tree, ""))
