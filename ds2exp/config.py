"""Structured configs: the schema every composed run config is checked against.

Each config group in `conf/` (dataset, model, optimizer, hardware, precision, logger, trainer)
is backed by one dataclass here. Hydra merges the YAML files onto these dataclasses, so a
misspelt key, a wrong type or a value outside an Enum fails at composition time with the
offending key named, before any work starts. Range checks that types cannot express
(lr > 0, batch size >= 1, ...) live in ds2exp/config_checks.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent


def project_root() -> str:
    """Absolute project directory: $DS2EXP_ROOT, else the checkout holding conf/, else the cwd.

    Used for the default MLflow store and data cache so that they do not depend on
    Hydra's per-run working directory.
    """
    env = os.environ.get("DS2EXP_ROOT")
    if env:
        return str(Path(env).resolve())
    checkout = PACKAGE_DIR.parent
    if (checkout / "conf" / "train.yaml").is_file():
        return str(checkout)
    return str(Path.cwd().resolve())


def config_dir() -> str:
    env = os.environ.get("DS2EXP_CONFIG_DIR")
    if env:
        return str(Path(env).resolve())
    checkout_conf = PACKAGE_DIR.parent / "conf"
    if (checkout_conf / "train.yaml").is_file():
        return str(checkout_conf)
    return str(Path.cwd().resolve() / "conf")


if not OmegaConf.has_resolver("ds2exp_root"):
    OmegaConf.register_new_resolver("ds2exp_root", project_root)


def group_options(group: str) -> List[str]:
    """The options of a config group: the names of the yaml files in conf/<group>/."""
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


def config_group_lines(config_name: str, *added: str) -> str:
    """The config groups of a command, for its --help (`${ds2exp_config_groups:train,sweep}` in the help
    template): one line per group of conf/<config_name>.yaml's defaults list, then per group in `added`
    (one the command line adds with +group=NAME), each with its options on disk and its default."""
    import yaml

    defaults = yaml.safe_load((Path(config_dir()) / f"{config_name}.yaml").read_text()).get("defaults", [])
    notes = {}
    for entry in defaults:
        if isinstance(entry, dict):  # `group: option`; plain names are schemas and _self_
            for key, option in entry.items():
                group = key.split()[-1].split("@")[0].lstrip("/")  # `optional group@package: option`
                if not group.startswith("hydra/"):
                    notes[group] = "none by default" if option is None else f"default: {option}"
    notes.update({group: f"add with +{group}=NAME" for group in added})
    width = max(len(group) for group in notes) + 2
    return "\n".join(f"  {group + ':':<{width}}{', '.join(group_options(group))}   ({note})"
                     for group, note in notes.items())


if not OmegaConf.has_resolver("ds2exp_config_groups"):
    OmegaConf.register_new_resolver("ds2exp_config_groups", config_group_lines)


def enum_value(x) -> str:
    """The string of a config value that is an Enum member in a structured config or a plain string."""
    return str(x.value if hasattr(x, "value") else x)


def choices(name: str, values: str) -> type[Enum]:
    """A str-valued Enum whose member names are its values, for a config field with a fixed set of choices."""
    return Enum(name, [(v, v) for v in values.split()], type=str, module=__name__)


DatasetSource = choices("DatasetSource", "synth librispeech manifest")
RNNType = choices("RNNType", "lstm gru")
MergeMode = choices("MergeMode", "sum concat")
Activation = choices("Activation", "hardtanh tanh relu")
KernelImpl = choices("KernelImpl", "fast plain")
OptimizerName = choices("OptimizerName", "adam adamw sgd")
Schedule = choices("Schedule", "constant exponential warmup_cosine")
DeviceTarget = choices("DeviceTarget", "CPU GPU Ascend")
ExecutionMode = choices("ExecutionMode", "pynative graph")
FeatureWindow = choices("FeatureWindow", "hamming hamming_symmetric hann hanning hann_symmetric blackman bartlett")
DType = choices("DType", "fp32 fp16 bf16")
LoggerBackend = choices("LoggerBackend", "mlflow none")
NonFinitePolicy = choices("NonFinitePolicy", "skip stop rollback")
MetricDefinition = choices("MetricDefinition", "reference standard")


@dataclass
class PathsConfig:
    root_dir: str = "${ds2exp_root:}"
    data_dir: str = "${paths.root_dir}/data"
    cache_dir: str = "${paths.data_dir}/feature_cache"


@dataclass
class FeatureConfig:
    sample_rate: int = 16000
    window_size: float = 0.02  # seconds: n_fft = win = 320 at 16 kHz -> 161 bins
    window_stride: float = 0.01
    # hamming: periodic, what the zoo's librosa.stft(window="hamming") trains on; hann: the zoo's
    # evaluation window; hamming_symmetric: np.hamming (ds2exp before features version 2)
    window: FeatureWindow = FeatureWindow.hamming
    # The reference used librosa < 0.10, whose centred STFT padded by reflection.
    pad_mode: str = "reflect"
    normalize: bool = True
    # Silent audio has a zero standard deviation: true divides by 1 there, false divides by it as the
    # model zoo does (NaN features)
    zero_std_guard: bool = True
    # auto: cache when the training split's features take <= cache_max_gb, else compute them on
    # the fly (a few percent of a step; docs/storage.md); on / off (true / false) force it
    cache: str = "auto"
    cache_max_gb: float = 4.0


@dataclass
class SpecAugmentConfig:
    enabled: bool = False
    freq_masks: int = 2
    freq_width: int = 20
    time_masks: int = 2
    time_width: int = 30


@dataclass
class DatasetConfig:
    name: str = "synth_tiny"
    source: DatasetSource = DatasetSource.synth
    # synth: corpus preset built into `root`; librispeech: `root` holds LibriSpeech/<subset>/...
    root: str = "${paths.data_dir}/${dataset.name}"
    train_subsets: List[str] = field(default_factory=lambda: ["train-synth"])
    val_subsets: List[str] = field(default_factory=lambda: ["dev-synth"])
    test_subsets: List[str] = field(default_factory=lambda: ["test-synth"])
    # manifest: JSON-lines, deepspeech.pytorch JSON or model zoo CSV (detected by content)
    train_manifest: Optional[str] = None
    val_manifest: Optional[str] = None
    test_manifest: Optional[str] = None
    batch_size: int = 16
    num_workers: int = 2
    min_duration: float = 0.0
    max_duration: float = 16.7
    num_buckets: int = 4
    sortagrad: bool = True
    max_utterances: Optional[int] = None
    # Drop utterances whose transcript needs more CTC frames than the model outputs (their loss
    # is infinite). false keeps them, e.g. to reproduce the reference's divergence.
    drop_infeasible: bool = True
    # Training only: utterances longer than this many feature frames are cut to it at a random offset,
    # keeping the whole transcript, as the model zoo does at 1250 (its cause of infinite CTC losses).
    # None: no crop. With drop_infeasible, feasibility is judged after the crop.
    crop_frames: Optional[int] = None
    # Training only: the label matrix is this many characters wide (the zoo's 350); a longer transcript,
    # which the zoo's padding cannot hold, is dropped and listed. None: as wide as the batch needs.
    label_pad: Optional[int] = None
    feature: FeatureConfig = field(default_factory=FeatureConfig)
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)


@dataclass
class ModelConfig:
    name: str = "ds2_tiny"
    conv_channels: int = 32
    conv_impl: KernelImpl = KernelImpl.fast
    activation: Activation = Activation.hardtanh
    batch_norm: bool = True
    rnn_type: RNNType = RNNType.lstm
    rnn_layers: int = 2
    rnn_hidden: int = 256
    bidirectional: bool = True
    merge: MergeMode = MergeMode.sum
    rnn_impl: KernelImpl = KernelImpl.fast
    # The reference spells its RNN block `RNN`; keep that so model zoo checkpoints load.
    rnn_block_name: str = "RNN"


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adam
    lr: float = 3e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    schedule: Schedule = Schedule.constant
    anneal: float = 1.1  # exponential: lr / anneal**epoch
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 400.0  # global-norm clipping; 0 disables


@dataclass
class HardwareConfig:
    name: str = "cpu"
    device_target: DeviceTarget = DeviceTarget.CPU
    num_devices: int = 1
    mode: ExecutionMode = ExecutionMode.pynative
    threads: Optional[int] = None
    blocking_launch: bool = True  # CPU: synchronous op launch, measured 2-30x faster on small CPUs


@dataclass
class PrecisionConfig:
    name: str = "fp32"
    dtype: DType = DType.fp32
    loss_scale: float = 1.0
    dynamic_loss_scale: bool = False
    scale_factor: float = 2.0
    scale_window: int = 1000


@dataclass
class LoggerConfig:
    backend: LoggerBackend = LoggerBackend.mlflow
    tracking_uri: str = "sqlite:///${paths.root_dir}/mlflow.db"
    experiment_name: str = "ds2exp"
    run_name: Optional[str] = None
    log_checkpoint: bool = True  # upload the best checkpoint as an artifact at the end


MONITORS = ("val/cer", "val/wer", "val/loss")


MonitorMode = choices("MonitorMode", "min max")


@dataclass
class DivergenceConfig:
    # A finite step is "exploded" when its loss is over `factor` x the median loss of the last `window`
    # good steps (after `min_history` of them), its global grad norm over `factor` x their median grad
    # norm, or its loss over `max_loss`. Exploded steps are skipped like non-finite ones; `patience` in a
    # row are a divergence (cause loss_explosion) under trainer.nonfinite=stop. Defaults measured on
    # synth_tiny: docs/diagnosis.md.
    enabled: bool = True
    factor: float = 20.0
    window: int = 20
    min_history: int = 1
    patience: int = 3
    max_loss: float = 1e5
    check_grad_norm: bool = True


@dataclass
class TrainerConfig:
    max_steps: int = -1  # -1: no step limit, max_epochs decides
    max_epochs: int = 10
    max_minutes: Optional[float] = None  # wall-clock budget for the training loop
    eval_every: int = 200
    checkpoint_every: int = 200
    log_every: int = 10
    keep_best: int = 3
    # The validation metric that picks the best checkpoints: val/cer (moves from the first evaluations
    # on, while WER sits at >= 100%: docs/diagnosis.md), val/wer or val/loss.
    monitor: str = "val/cer"
    monitor_mode: MonitorMode = MonitorMode.min
    seed: int = 1234
    # skip: a non-finite step is skipped; `nonfinite_patience` in a row stop the run with a diagnosis.
    # stop: the first non-finite step stops the run with a diagnosis.
    # rollback: after `nonfinite_patience` in a row, reload the last checkpoint and multiply the
    #           learning rate by `rollback_lr_factor`, at most `max_rollbacks` times, then stop.
    nonfinite: NonFinitePolicy = NonFinitePolicy.skip
    nonfinite_patience: int = 20
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    # Fault injection: 0-based steps whose gradients are replaced by NaN (each fires once).
    inject_nan_grad_steps: List[int] = field(default_factory=list)
    # ... on this data-parallel rank only (null: every rank); drills that ranks skip together.
    inject_nan_grad_rank: Optional[int] = None
    max_eval_utterances: Optional[int] = None
    metric: MetricDefinition = MetricDefinition.reference
    progress: bool = True
    # Resume the newest interrupted run (killed, machine down) of this same configuration found under
    # outputs/ and multirun/ instead of starting a new one (ds2exp/training/recovery.py).
    auto_resume: bool = False


@dataclass
class CorpusModelConfig:
    """The groups shared by the commands that read a corpus and build a model (train, evaluate, export).
    The model group also describes checkpoints that carry no config of their own (model zoo checkpoints)."""
    defaults: List[Any] = field(default_factory=list)
    paths: PathsConfig = field(default_factory=PathsConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)


@dataclass
class TrainConfig(CorpusModelConfig):
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    resume: Optional[str] = None
    pretrained: Optional[str] = None


DecoderName = choices("DecoderName", "greedy beam")


@dataclass
class DecoderConfig:
    name: DecoderName = DecoderName.greedy
    beam_width: int = 50
    alpha: float = 0.5  # language model weight (beam with lm_path only)
    beta: float = 1.0  # word insertion bonus (beam with lm_path only)
    lm_path: Optional[str] = None  # KenLM ARPA/binary; needs the `lm` extra
    # log-score added to a word outside the LM's vocabulary (pyctcdecode's default -10); lower it
    # when the vocabulary is closed (the synthetic corpora), keep it for open-vocabulary speech
    unk_score_offset: float = -10.0


EvalCompat = choices("EvalCompat", "none zoo")


@dataclass
class EvaluateConfig(CorpusModelConfig):
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    checkpoint: Optional[str] = None  # a .ckpt, a run directory or an MLflow run id
    checkpoints: List[str] = field(default_factory=list)  # several, compared side by side
    split: str = "test"
    metric: MetricDefinition = MetricDefinition.reference
    max_utterances: Optional[int] = None
    progress: bool = True
    # zoo: score as the MindSpore model zoo's eval.py does (ds2exp/evaluation/zoo_compat.py)
    compat: EvalCompat = EvalCompat.none


ExportFormat = choices("ExportFormat", "MINDIR ONNX AIR")


@dataclass
class ExportConfig(CorpusModelConfig):
    checkpoint: Optional[str] = None
    format: ExportFormat = ExportFormat.MINDIR
    output: Optional[str] = None  # default: beside the checkpoint
    frames: int = 0  # 0: the graph takes any number of frames; N: a graph fixed at N frames (pad to N)
    verify_utterances: int = 4  # real utterances (of different lengths) the exported file is run on
    split: str = "test"
    tolerance: float = 1e-5
    progress: bool = True


@dataclass
class TranscribeConfig:
    defaults: List[Any] = field(default_factory=list)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    checkpoint: Optional[str] = None  # a .ckpt or a run directory
    exported: Optional[str] = None  # a MindIR written by export.py: runs without ds2exp's model code
    audio: List[str] = field(default_factory=list)
    json: bool = False  # one JSON object per file, with per-character start times
    chunk_seconds: float = 20.0  # audio decoded and recognised this many seconds at a time
    beam_width: Optional[int] = None  # a short form of decoder.beam_width


def register_configs() -> None:
    cs = ConfigStore.instance()
    # One schema for the whole run: conf/train.yaml lists it first in its defaults, so every
    # group file merged after it is checked key by key and type by type.
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="transcribe_schema", node=TranscribeConfig)


class ConfigValueError(ValueError):
    """A config value of the right type but outside its allowed range."""

    def __init__(self, key: str, value: Any, allowed: str):
        super().__init__(f"{key}={value!r} is not allowed; expected {allowed}")
        self.key = key


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigValueError(key, value, allowed)


register_configs()
