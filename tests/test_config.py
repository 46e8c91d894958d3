import subprocess
import sys
from pathlib import Path

import pytest

from ds2exp.cli import ConfigError, check_overrides, split_overrides

ROOT = Path(__file__).resolve().parents[1]


def run_train(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env=env)


def test_print_composed_config():
    r = run_train("--cfg", "job", "dataset=synth_small", "model=ds2_reference", "precision=fp16")
    assert r.returncode == 0, r.stderr
    assert "name: ds2_reference" in r.stdout and "rnn_hidden: 1024" in r.stdout
    assert "dtype: fp16" in r.stdout and "name: synth_small" in r.stdout


@pytest.mark.parametrize("override, expected", [
    ("optimizer.lrr=1", "unknown config key 'optimizer.lrr'"),
    ("precision=fp64", "precision=fp64 is not an option; allowed: bf16, fp16, fp32"),
    ("optimizer.lr=0", "optimizer.lr=0.0 is not allowed"),
    ("dataset.batch_size=0", "dataset.batch_size=0 is not allowed"),
    ("trainer.max_steps=abc", "trainer.max_steps"),
    ("model.rnn_type=rnn", "expected one of [lstm, gru]"),
    ("resume=/no/such/checkpoint", "resume='/no/such/checkpoint' is not allowed"),
])
def test_bad_override_exits_2_with_one_line(override, expected, tmp_path):
    r = run_train(override)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert expected in lines[0]
    assert not (ROOT / "outputs").exists() or not any(
        override in p.read_text() for p in (ROOT / "outputs").rglob("overrides.yaml"))


def test_every_sweep_value_is_checked():
    with pytest.raises(ConfigError, match="optimizer.lr=-0.1"):
        check_overrides(["optimizer.lr=1e-3,-0.1", "dataset.batch_size=4,8"])
    cfg = check_overrides(["optimizer.lr=1e-3,1e-2", "dataset.batch_size=4,8"])
    assert cfg.optimizer.lr == 1e-3


def test_sgd_momentum_settings_are_checked_before_mindspore_sees_them():
    # MindSpore's SGD raises a ValueError deep in the run for Nesterov without momentum
    with pytest.raises(ConfigError, match=r"optimizer.nesterov=True is not allowed; expected false when "
                                          r"optimizer.momentum=0"):
        check_overrides(["optimizer=sgd", "optimizer.momentum=0"])
    with pytest.raises(ConfigError, match=r"optimizer.momentum=1.5 is not allowed"):
        check_overrides(["optimizer=sgd", "optimizer.momentum=1.5"])
    cfg = check_overrides(["optimizer=sgd", "optimizer.momentum=0", "optimizer.nesterov=false"])
    assert cfg.optimizer.momentum == 0 and not cfg.optimizer.nesterov


def test_split_overrides_drops_hydra_flags():
    assert split_overrides(["-m", "--cfg", "job", "a=1", "--config-name=x", "b=2"]) == ["a=1", "b=2"]


def test_groups_compose():
    for group, option, key, value in [("hardware", "gpu", "device_target", "GPU"),
                                      ("hardware", "ascend", "device_target", "Ascend"),
                                      ("precision", "fp16", "dtype", "fp16"),
                                      ("optimizer", "sgd", "nesterov", True),
                                      ("logger", "none", "backend", "none")]:
        cfg = check_overrides([f"{group}={option}"])
        got = cfg[group][key]
        assert (got.value if hasattr(got, "value") else got) == value


def test_bf16_composes_for_gpu():
    cfg = check_overrides(["precision=bf16", "hardware=gpu"])
    assert cfg.precision.dtype.value == "bf16"
