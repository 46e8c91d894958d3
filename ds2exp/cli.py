"""Checks a command line's config before Hydra starts a run.

Hydra reports composition errors over several lines and exits with 1, after which a run
directory may already exist. `preflight()` composes the same config with Hydra's compose API
(every value of every sweep is tried, including the sweeper params a `+sweep=<preset>` sets), runs
`config_checks.validate()` (values and ranges), checks Hydra's run/sweep directory
and the files the command names (ds2exp/file_checks.py), and on any problem prints ONE line
naming the key and what is allowed, then exits with status 2. An output location that cannot be
created (run directory, MLflow store folder, export file) exits with status 3. Nothing is created
either way. A plain command line is composed once here (and once more by @hydra.main); the
returned config is for the caller to reuse.

Other entry points (python -m ds2exp.transcribe / average / sweeps.report / lr_find) call
`refuse(key, value, allowed)` or `config_error(message)` for the same one-line, exit-2 contract.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, List, NoReturn, Optional

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from ds2exp.config import ConfigValueError, config_dir
from ds2exp.config_checks import check_hydra_dirs, validate
from ds2exp.file_checks import check_device, check_inputs

EXIT_CONFIG_ERROR = 2
EXIT_OUTPUT_ERROR = 3  # the run directory or the MLflow store folder cannot be created

# Flags of Hydra's own parser that consume the following argument.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}


class ConfigError(Exception):
    pass


def split_overrides(argv: Iterable[str]) -> List[str]:
    """The override arguments of a Hydra command line (flags and their values removed)."""
    out: List[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith("-"):
            name = arg.split("=", 1)[0]
            if name in _FLAGS_WITH_VALUE and "=" not in arg:
                # --info takes an optional value; only skip one that is not an override
                skip = True
            continue
        out.append(arg)
    return out


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def _describe(exc: BaseException, base: Optional[DictConfig]) -> str:
    """Turn a Hydra/OmegaConf exception into one line naming key and allowed values."""
    if isinstance(exc, ConfigValueError):
        return str(exc)
    if isinstance(exc, MissingConfigException):
        group = None
        msg = str(exc)
        options = getattr(exc, "options", None)
        missing = getattr(exc, "missing_cfg_file", None) or ""
        if "/" in missing:
            group, choice = missing.rsplit("/", 1)
            if options:
                return f"{group}={choice} is not an option; allowed: {', '.join(sorted(options))}"
        return _one_line(msg)
    cause = exc.__cause__ or exc.__context__
    inner = cause if isinstance(cause, OmegaConfBaseException) else exc
    if isinstance(inner, OmegaConfBaseException):
        full_key = getattr(inner, "full_key", None)
        first = str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__
        if full_key and (type(inner).__name__ in ("ConfigKeyError", "ConfigAttributeError") or " not in " in first):
            parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
            allowed = ""
            if base is not None:
                node = OmegaConf.select(base, parent) if parent else base
                if isinstance(node, DictConfig):
                    allowed = "; allowed keys" + (f" under '{parent}'" if parent else "") + ": " + ", ".join(
                        k for k in node.keys() if k != "defaults")
            return f"unknown config key '{full_key}'{allowed}"
        if full_key:
            return f"bad value for '{full_key}': {first}"
        return _one_line(first)
    return _one_line(str(exc))


def _allowed_keys(base: Optional[DictConfig], parent: str) -> str:
    if base is None:
        return ""
    node = OmegaConf.select(base, parent) if parent else base
    if not isinstance(node, DictConfig):
        return ""
    return "; allowed keys" + (f" under '{parent}'" if parent else "") + ": " + ", ".join(
        k for k in node.keys() if k != "defaults")


def _check_added_keys(overrides: List[str], base: Optional[DictConfig]) -> None:
    """`+key=value` / `++key=value` bypass the schema's key check; refuse keys the schema lacks
    (config groups such as `+sweep=<preset>` and `hydra.*` stay allowed)."""
    if base is None:
        return
    groups = {p.name for p in Path(config_dir()).iterdir() if p.is_dir()}
    for ov in overrides:
        if not ov.startswith("+") or "=" not in ov:
            continue
        key = ov.lstrip("+").split("=", 1)[0].strip()
        head = key.split("/", 1)[0]
        if (head in groups and "." not in key) or key.split(".", 1)[0].split("/", 1)[0] == "hydra":
            continue  # a config group choice (`+sweep=<preset>`) or Hydra's own settings
        if OmegaConf.select(base, key, default="__missing__", throw_on_missing=False) == "__missing__":
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            raise ConfigError(f"unknown config key '{key}' (added with '+'){_allowed_keys(base, parent)}")


def _check_repeated_keys(overrides: List[str]) -> None:
    """A key given twice (`optimizer.lr=1e-3 optimizer.lr=2e-3`) is refused, as Hydra refuses a config group
    given twice: silently taking the last would run something the user did not read back."""
    seen = {}
    for ov in overrides:
        if "=" not in ov:
            continue
        key = ov.split("=", 1)[0].strip().lstrip("+~")
        if key in seen:
            raise ConfigError(f"'{key}' is given twice ({seen[key]} and {ov}); give each key once")
        seen[key] = ov


def _sweep_variants(overrides: List[str]) -> List[List[str]]:
    """Override lists that together try every value of every sweep at least once."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    base: List[str] = []
    choices: List[tuple[int, List[str]]] = []
    for i, ov in enumerate(parsed):
        key = ov.get_key_element()
        if ov.is_sweep_override():
            try:
                values = list(ov.sweep_string_iterator())
            except Exception:  # interval() etc: sampled by the sweeper, checked when the job runs
                values = []
            if not values:
                base.append(None)  # type: ignore[arg-type]
                continue
            base.append(f"{key}={values[0]}")
            choices.append((i, [f"{key}={v}" for v in values[1:]]))
        else:
            base.append(overrides[i])
    variants = [[o for o in base if o is not None]]
    for i, rest in choices:
        for alt in rest:
            v = list(base)
            v[i] = alt
            variants.append([o for o in v if o is not None])
    return variants


def compose_config(overrides: List[str], config_name: str = "train", return_hydra_config: bool = False) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base=None):
            return compose(config_name=config_name, overrides=overrides, return_hydra_config=return_hydra_config)
    finally:
        GlobalHydra.instance().clear()


def _sweeper_params(cfg: DictConfig, overrides: List[str]) -> List[str]:
    """`hydra.sweeper.params` (e.g. from a `+sweep=<preset>`) as overrides, for keys the command
    line does not set itself (there, as in the sweeper, the command line wins)."""
    params = OmegaConf.select(cfg, "hydra.sweeper.params")
    params = OmegaConf.to_container(params) if params is not None else {}
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return [f"{k}={v}" for k, v in (params or {}).items() if isinstance(v, (str, int, float)) and k not in keys]


def _base(config_name: str) -> Optional[DictConfig]:
    """The config without overrides: the allowed keys an error message lists."""
    try:
        return compose_config([], config_name)
    except Exception:  # noqa: BLE001 - only used to word an error message
        return None


def _without_hydra(cfg: DictConfig) -> DictConfig:
    job = cfg.copy()
    with open_dict(job):
        job.pop("hydra", None)
    return job


def _check_variant(cfg: DictConfig, extra_check, checked_inputs: set) -> None:
    OmegaConf.resolve(cfg)
    check_hydra_dirs(cfg.hydra)
    job = _without_hydra(cfg)
    validate(job)
    if extra_check is not None:
        extra_check(job)
    inputs = repr([job.get(k) for k in ("resume", "pretrained", "checkpoint", "checkpoints", "decoder", "model",
                                        "precision", "dataset")])
    if inputs not in checked_inputs:  # a sweep over lr need not re-read its checkpoint per value
        check_inputs(job)
        checked_inputs.add(inputs)


def check_overrides(overrides: List[str], config_name: str = "train",
                    extra_check: Optional[Callable[[DictConfig], None]] = None,
                    with_hydra: bool = False) -> DictConfig:
    """Compose and validate every sweep value (values, Hydra's run/sweep dirs, named input files);
    raises ConfigError with a one-line message. Returns the first variant's config (with its `hydra`
    node when `with_hydra`). A plain command line is composed once."""
    _check_repeated_keys(overrides)
    if any(o.startswith("+") for o in overrides):
        _check_added_keys(overrides, _base(config_name))
    try:
        variants = _sweep_variants(overrides)
    except OverrideParseException as exc:
        raise ConfigError(_one_line(str(exc)).split(" See ")[0]) from exc
    checked_inputs: set = set()
    first: Optional[DictConfig] = None
    i = 0
    while i < len(variants):
        try:
            cfg = compose_config(variants[i], config_name, return_hydra_config=True)
            if first is None:
                extra = _sweeper_params(cfg, overrides)
                if extra:  # a preset's sweep: its values are checked like the command line's
                    variants = _sweep_variants(overrides + extra)
                    cfg = compose_config(variants[0], config_name, return_hydra_config=True)
            _check_variant(cfg, extra_check, checked_inputs)
        except (HydraException, OmegaConfBaseException, ConfigValueError, ValueError) as exc:
            raise ConfigError(_describe(exc, _base(config_name) if _needs_base(exc) else None)) from exc
        if first is None:
            first = cfg
        i += 1
    assert first is not None
    return first if with_hydra else _without_hydra(first)


def _needs_base(exc: BaseException) -> bool:
    inner = exc.__cause__ or exc.__context__
    return not isinstance(exc, ConfigValueError) and isinstance(inner or exc, OmegaConfBaseException)


def _why_not_creatable(path: Path) -> Optional[str]:
    """None when `path` is, or can be made, a writable folder; otherwise why not. Tried for real: a
    folder is made in the nearest existing one and removed again."""
    probe = Path(os.path.abspath(path))
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a directory"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ds2exp-probe-", dir=probe))
    except OSError as exc:
        return f"cannot create a folder in {probe} ({exc.strerror or exc})"
    return None


def check_outputs(cfg: DictConfig, multirun: bool) -> None:
    """Raise OutputError (one line) when the run/sweep directory, the SQLite store's folder or an
    export's output file cannot be created, before Hydra creates anything. `cfg` has its hydra node."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    targets = [(key, str(OmegaConf.select(cfg, key)), "run directory")]
    uri = OmegaConf.select(cfg, "logger.tracking_uri", default=None)
    backend = OmegaConf.select(cfg, "logger.backend", default=None)
    if uri and str(getattr(backend, "value", backend)) == "mlflow" and str(uri).startswith("sqlite:///"):
        targets.append(("logger.tracking_uri", str(Path(str(uri)[len("sqlite:///"):]).parent), "MLflow store folder"))
    output = cfg.get("output") if "format" in cfg else None  # export.py
    if output:
        if Path(output).is_dir():
            raise OutputError(f"output={output} is a directory; give the file to write (e.g. {output}/model.mindir)")
        targets.append(("output", str(Path(output).parent), "folder for output"))
    for key, path, what in targets:
        why = _why_not_creatable(Path(path))
        if why:
            raise OutputError(f"cannot create the {what} {os.path.abspath(path)}: {why} (set {key} to a writable "
                              f"folder)")


class OutputError(Exception):
    pass


def config_error(message: str) -> "NoReturn":
    """Print `config error: <message>` (one line) on stderr and exit with status 2."""
    print(f"config error: {_one_line(message)}", file=sys.stderr)
    sys.exit(EXIT_CONFIG_ERROR)


def check_argument_outputs(tracking_uri: Optional[str] = None, out_file: Optional[str] = None,
                           tracking_key: str = "--tracking-uri", out_key: str = "--out") -> None:
    """For argparse commands: a tracking URI of a supported scheme (else exit 2) and an output file
    whose folder can be created (else exit 3), each refused in one line."""
    from ds2exp.config_checks import check_tracking_uri

    if tracking_uri is not None:
        try:
            check_tracking_uri(tracking_uri, tracking_key)
        except ConfigValueError as exc:
            config_error(str(exc))
    if out_file is not None:
        why = "it is a directory" if Path(out_file).is_dir() else _why_not_creatable(Path(out_file).parent)
        if why:
            print(f"output error: cannot write {out_key} {os.path.abspath(out_file)}: {why}", file=sys.stderr)
            sys.exit(EXIT_OUTPUT_ERROR)


def refuse(key: str, value, allowed: str) -> "NoReturn":
    """The one-line refusal of a bad argument, worded like the config checks'."""
    config_error(str(ConfigValueError(key, value, allowed)))


def resume_in_place(resume: str) -> List[str]:
    """Hydra overrides that make a `resume=` session run in the run directory it continues, so that its
    train.log is appended there (its own .hydra/ files go to .hydra/resumed/, keeping the first ones)."""
    from ds2exp.checkpoints.names import resumed_run_dir
    from ds2exp.file_checks import check_checkpoint

    info = check_checkpoint("resume", resume, need_training_state=True)
    run_dir = str(resumed_run_dir(resume, info.meta or {}).resolve()).replace("\\", "\\\\").replace("'", "\\'")
    return [f"hydra.run.dir='{run_dir}'", "hydra.output_subdir=.hydra/resumed"]


def preflight(argv: List[str], config_name: str = "train",
              extra_check: Optional[Callable[[DictConfig], None]] = None) -> Optional[DictConfig]:
    """Exit with status 2 and one line on stderr if the command line's config is bad, or with status 3
    if its run directory or another output cannot be created. Returns the composed config (the first
    sweep value's, without the hydra node) for the caller to reuse."""
    if any(a in ("--help", "-h", "--hydra-help") for a in argv):
        return None
    overrides = split_overrides(argv)
    try:
        cfg = check_overrides(overrides, config_name, extra_check, with_hydra=True)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    if "submitit" not in str(OmegaConf.select(cfg, "hydra.launcher._target_", default="")):  # trains here
        try:
            check_device(_without_hydra(cfg))
        except ConfigValueError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            sys.exit(EXIT_CONFIG_ERROR)
    if not any(a.split("=", 1)[0] in ("--cfg", "-c", "--info", "-i") for a in argv):  # those print; create nothing
        try:
            check_outputs(cfg, multirun=any(a in ("-m", "--multirun") for a in argv))
        except OutputError as exc:
            print(f"output error: {exc}", file=sys.stderr)
            sys.exit(EXIT_OUTPUT_ERROR)
    return _without_hydra(cfg)
