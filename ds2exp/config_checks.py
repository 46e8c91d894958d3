"""Value checks of a composed config (train, evaluate or export) that types cannot express.

`validate_config(cfg)` raises `ConfigValueError` naming the first bad key and what it allows.
Two layers:
- every leaf: floats finite, integers within +-2**53, strings not empty (a new field is covered
  without a line here);
- per key: the ranges below (one table per config group, applied where the group exists).
Hydra's own settings (`hydra.run.dir`, `hydra.sweep.dir`) are checked by `check_hydra_dirs`; the
files a command names (checkpoints, manifests, LM) by `ds2exp.file_checks`.
"""
from __future__ import annotations

import math
import os
import re
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Optional, Tuple

from omegaconf import DictConfig, ListConfig

from ds2exp.config import MONITORS, ConfigValueError, DeviceTarget, DType, OptimizerName, project_root

MAX_INT = 2 ** 53
SEED_MAX = 2 ** 32 - 1  # numpy's and MindSpore's seeds are unsigned 32-bit
MAX_LOSS_SCALE = 2.0 ** 24  # MindSpore's DynamicLossScaleManager starts here; more overflows fp16 at once
WINDOWS = ("hamming", "hamming_symmetric", "hann", "hanning", "hann_symmetric", "blackman", "bartlett")
# MLflow stores ds2exp works with; a bare path is refused so that an empty or mistyped value never
# turns into an `mlruns/` folder in the working directory.
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "databricks")
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigValueError(key, value, allowed)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def _leaves(node: Any, prefix: str = "") -> Iterable[Tuple[str, Any]]:
    if isinstance(node, DictConfig):
        for k in node.keys():
            if prefix == "" and k in ("hydra", "defaults"):
                continue
            yield from _leaves(node[k], f"{prefix}{k}.")
    elif isinstance(node, ListConfig):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{prefix[:-1]}[{i}].")
    else:
        yield prefix[:-1], node


def check_leaves(cfg: DictConfig) -> None:
    """Finite floats, bounded integers, non-empty strings, everywhere in the config."""
    for key, v in _leaves(cfg):
        if isinstance(v, bool) or v is None or isinstance(v, Enum):
            continue
        if isinstance(v, float):
            _check(math.isfinite(v), key, v, "a finite number")
        elif isinstance(v, int):
            _check(-MAX_INT <= v <= MAX_INT, key, v, "an integer within +-2**53")
        elif isinstance(v, str):
            _check(v.strip() != "", key, v, "a non-empty value (or null where the key allows it)")


def _int_at_least(sect: DictConfig, prefix: str, keys: Iterable[str], low: int, high: int = MAX_INT) -> None:
    for k in keys:
        if k in sect:
            v = sect[k]
            _check(low <= v <= high, f"{prefix}.{k}", v,
                   f"an integer >= {low}" + (f" and <= {high}" if high < MAX_INT else ""))


def _optional_at_least(value: Optional[int], key: str, low: int) -> None:
    _check(value is None or value >= low, key, value, f"null or an integer >= {low}")


def _dataset(d: DictConfig) -> None:
    _check(bool(_NAME.match(d.name)) and d.name not in (".", ".."), "dataset.name", d.name,
           "a folder name (letters, digits, _ . + -)")
    _int_at_least(d, "dataset", ("batch_size", "num_buckets"), 1, 65536)
    _int_at_least(d, "dataset", ("num_workers",), 0, 256)
    _check(d.min_duration >= 0, "dataset.min_duration", d.min_duration, "a number >= 0")
    _check(d.max_duration > d.min_duration, "dataset.max_duration", d.max_duration,
           f"a number > dataset.min_duration ({d.min_duration})")
    _optional_at_least(d.max_utterances, "dataset.max_utterances", 1)
    _optional_at_least(d.get("crop_frames"), "dataset.crop_frames", 16)
    _optional_at_least(d.get("label_pad"), "dataset.label_pad", 1)
    for k in ("train_subsets", "val_subsets", "test_subsets"):
        for s in d[k]:
            _check(bool(_NAME.match(str(s))) and s not in (".", ".."), f"dataset.{k}", list(d[k]),
                   "folder names (letters, digits, _ . + -)")
    f = d.feature
    _check(1000 <= f.sample_rate <= 192000, "dataset.feature.sample_rate", f.sample_rate,
           "an integer in [1000, 192000] (Hz)")
    _check(0 < f.window_size <= 1 and f.window_size * f.sample_rate >= 16, "dataset.feature.window_size",
           f.window_size, f"seconds in (0, 1] covering >= 16 samples at {f.sample_rate} Hz")
    _check(0 < f.window_stride <= f.window_size and f.window_stride * f.sample_rate >= 1,
           "dataset.feature.window_stride", f.window_stride,
           f"seconds in (0, dataset.feature.window_size={f.window_size}] covering >= 1 sample")
    _check(f.pad_mode in ("reflect", "constant"), "dataset.feature.pad_mode", f.pad_mode, "reflect or constant")
    if "spec_augment" in d:
        _int_at_least(d.spec_augment, "dataset.spec_augment", ("freq_masks", "freq_width", "time_masks",
                                                               "time_width"), 0, 100000)
    if _plain(d.source) == "manifest":
        _check(d.train_manifest is not None, "dataset.train_manifest", d.train_manifest,
               "a path to a manifest when dataset.source=manifest")


def _model(m: DictConfig) -> None:
    _int_at_least(m, "model", ("conv_channels",), 1, 4096)
    _int_at_least(m, "model", ("rnn_layers",), 1, 64)
    _int_at_least(m, "model", ("rnn_hidden",), 1, 16384)
    _check(m.rnn_block_name in ("RNN", "rnn"), "model.rnn_block_name", m.rnn_block_name, "RNN or rnn")


def _optimizer(o: DictConfig) -> None:
    _check(o.lr > 0, "optimizer.lr", o.lr, "a number > 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optimizer.betas", list(o.betas),
           "two numbers in [0, 1)")
    _check(o.eps > 0, "optimizer.eps", o.eps, "a number > 0")
    _check(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "a number >= 0")
    _check(o.grad_clip >= 0, "optimizer.grad_clip", o.grad_clip, "a number >= 0 (0 disables clipping)")
    _check(o.anneal >= 1, "optimizer.anneal", o.anneal, "a number >= 1")
    _int_at_least(o, "optimizer", ("warmup_steps",), 0)
    _check(0 <= o.min_lr_ratio <= 1, "optimizer.min_lr_ratio", o.min_lr_ratio,
           "a number in [0, 1] (the final lr as a fraction of optimizer.lr)")
    if _plain(o.name) == OptimizerName.sgd.value:
        _check(0 <= o.momentum < 1, "optimizer.momentum", o.momentum, "a number in [0, 1)")
        _check(not (o.nesterov and o.momentum == 0), "optimizer.nesterov", True,
               "false when optimizer.momentum=0 (Nesterov momentum needs momentum > 0)")


def _hardware(h: DictConfig) -> None:
    _int_at_least(h, "hardware", ("num_devices",), 1, 4096)
    _check(h.threads is None or 1 <= h.threads <= 4096, "hardware.threads", h.threads,
           "null or an integer in [1, 4096]")


def _precision(p: DictConfig, h: Optional[DictConfig]) -> None:
    _check(0 < p.loss_scale <= MAX_LOSS_SCALE, "precision.loss_scale", p.loss_scale,
           "a number in (0, 2**24]")
    _check(p.scale_factor > 1, "precision.scale_factor", p.scale_factor, "a number > 1")
    _int_at_least(p, "precision", ("scale_window",), 1)
    # Measured with MindSpore 2.8: its CPU conv/LSTM kernels have no bfloat16 implementation.
    _check(not (_plain(p.dtype) == DType.bf16.value and h is not None
                and _plain(h.device_target) == DeviceTarget.CPU.value), "precision", "bf16",
           "fp32 or fp16 with hardware=cpu (MindSpore 2.8 has no bfloat16 CPU kernels for conv/LSTM); "
           "bf16 runs with hardware=gpu or hardware=ascend")


def check_tracking_uri(uri: str, key: str = "logger.tracking_uri") -> None:
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    allowed = ("sqlite:///<file>, file:///<folder>, http(s)://<server>, postgresql://..., mysql://... "
               "or databricks[://<profile>]")
    if uri == "databricks":
        return
    _check(scheme in TRACKING_SCHEMES and not re.match(r"^[A-Za-z]:[\\/]", uri), key, uri, allowed)
    rest = uri.split(":", 1)[1]
    if scheme == "sqlite":
        _check(rest.startswith("///") and len(rest) > 3 and rest[3:] != ":memory:", key, uri,
               "sqlite:///<path to a database file>")
    elif scheme == "file":
        _check(len(rest.lstrip("/")) > 0, key, uri, "file:///<absolute folder>")
    elif scheme in ("http", "https", "postgresql", "mysql"):
        _check(rest.startswith("//") and len(rest.strip("/")) > 0, key, uri, f"{scheme}://<host>[:port]...")


def _logger(lg: DictConfig) -> None:
    if _plain(lg.backend) == "mlflow":
        check_tracking_uri(str(lg.tracking_uri))


def _trainer(t: DictConfig, num_devices: int) -> None:
    _check(t.max_steps == -1 or 1 <= t.max_steps <= MAX_INT, "trainer.max_steps", t.max_steps,
           "-1 or an integer >= 1")
    _int_at_least(t, "trainer", ("max_epochs", "eval_every", "checkpoint_every", "log_every", "keep_best",
                                 "nonfinite_patience"), 1)
    _check(t.max_minutes is None or t.max_minutes > 0, "trainer.max_minutes", t.max_minutes, "null or a number > 0")
    _check(0 <= t.seed <= SEED_MAX, "trainer.seed", t.seed, f"an integer in [0, {SEED_MAX}]")
    _check(0 < t.rollback_lr_factor < 1, "trainer.rollback_lr_factor", t.rollback_lr_factor, "a number in (0, 1)")
    _int_at_least(t, "trainer", ("max_rollbacks",), 0)
    steps = list(t.get("inject_nan_grad_steps") or [])
    _check(all(s >= 0 for s in steps), "trainer.inject_nan_grad_steps", steps, "a list of step numbers >= 0")
    rank = t.get("inject_nan_grad_rank")
    _check(rank is None or 0 <= rank < num_devices, "trainer.inject_nan_grad_rank", rank,
           f"null or a rank in [0, {num_devices - 1}]")
    _optional_at_least(t.get("max_eval_utterances"), "trainer.max_eval_utterances", 1)
    if num_devices > 1:
        # Claiming an interrupted run is a per-process lock dance; a data-parallel run resumes by name.
        _check(not t.get("auto_resume"), "trainer.auto_resume", True,
               "false with hardware.num_devices > 1 (resume a data-parallel run with resume=<run dir>)")


def _decoder(dec: DictConfig) -> None:
    _int_at_least(dec, "decoder", ("beam_width",), 1, 100000)


def _command_keys(cfg: DictConfig) -> None:
    """Top-level keys of evaluate.yaml / export.yaml."""
    if "split" in cfg:
        _check(cfg.split in ("train", "val", "test"), "split", cfg.split, "one of train, val, test")
    if "max_utterances" in cfg:
        _optional_at_least(cfg.max_utterances, "max_utterances", 1)
    if "verify_utterances" in cfg:
        _check(1 <= cfg.verify_utterances <= 100000, "verify_utterances", cfg.verify_utterances,
               "an integer in [1, 100000]")
    if "tolerance" in cfg:
        _check(cfg.tolerance > 0, "tolerance", cfg.tolerance, "a number > 0")
    if "frames" in cfg:
        _check(0 <= cfg.frames <= 1_000_000, "frames", cfg.frames,
               "0 (the longest verification utterance) or a frame count <= 1000000")


def validate_config(cfg: DictConfig) -> None:
    """Per-key ranges first (their messages say the range), then every leaf's finiteness/emptiness."""
    h = cfg.get("hardware")
    if "dataset" in cfg:
        _dataset(cfg.dataset)
    if "model" in cfg:
        _model(cfg.model)
    if "optimizer" in cfg:
        _optimizer(cfg.optimizer)
    if h is not None:
        _hardware(h)
    if "precision" in cfg:
        _precision(cfg.precision, h)
    if "logger" in cfg:
        _logger(cfg.logger)
    if "trainer" in cfg:
        _trainer(cfg.trainer, int(h.num_devices) if h is not None else 1)
    if "decoder" in cfg:
        _decoder(cfg.decoder)
    _command_keys(cfg)
    check_leaves(cfg)


def _is_same_or_above(path: Path, other: Path) -> bool:
    try:
        other.relative_to(path)
        return True
    except ValueError:
        return False


def check_hydra_dirs(hydra_cfg: DictConfig) -> None:
    """`hydra.run.dir` / `hydra.sweep.dir`: not empty, and not the project root, the working folder or a
    folder above them (a run writes checkpoints/, .hydra/ and run_state.json into its directory)."""
    guarded = {Path(project_root()).resolve(), Path.cwd().resolve()}
    for key in ("run.dir", "sweep.dir"):
        value = hydra_cfg.get(key.split(".")[0], {}).get("dir")
        if value is None:
            continue
        value = str(value)
        _check(value.strip() != "", f"hydra.{key}", value, "a folder for this run's outputs (not empty)")
        target = Path(os.path.abspath(os.path.expanduser(value)))
        _check(not any(_is_same_or_above(target, g) for g in guarded), f"hydra.{key}", value,
               "a folder of its own, not the project root, the working folder or a folder above them")


def validate(cfg: DictConfig) -> None:
    """Range checks that types cannot express, for train, evaluate and export configs. Raises
    ConfigValueError naming the key: the shared per-group ranges and leaf checks first, then the
    feature cache, the monitored metric and the divergence detector."""
    validate_config(cfg)
    d = cfg.get("dataset")
    if d is not None:
        _check(str(d.feature.cache).lower() in ("auto", "on", "off", "true", "false"), "dataset.feature.cache",
               d.feature.cache, "auto, on (true) or off (false)")
        _check(d.feature.cache_max_gb >= 0, "dataset.feature.cache_max_gb", d.feature.cache_max_gb,
               "a number >= 0")
    t = cfg.get("trainer")
    if t is None:
        return
    _check(t.monitor in MONITORS, "trainer.monitor", t.monitor, ", ".join(MONITORS))
    dv = t.divergence
    _check(dv.factor > 1, "trainer.divergence.factor", dv.factor, "a number > 1")
    for key in ("window", "min_history", "patience"):
        _check(dv[key] >= 1, f"trainer.divergence.{key}", dv[key], "an integer >= 1")
    _check(dv.max_loss > 0, "trainer.divergence.max_loss", dv.max_loss, "a number > 0")
