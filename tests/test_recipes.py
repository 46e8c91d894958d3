"""conf/experiment recipes: the zoo's LibriSpeech train-clean-100 run and fine-tuning a zoo checkpoint,
composed as `python train.py experiment=... --cfg job` does."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def libri_root(tmp_path_factory):
    """An (empty) extracted-LibriSpeech layout: enough for composition, which checks the folder exists."""
    root = tmp_path_factory.mktemp("libri")
    for subset in ("train-clean-100", "dev-clean", "test-clean"):
        (root / "LibriSpeech" / subset).mkdir(parents=True)
    return root


def cfg_job(*args):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--cfg", "job"], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    return r


def test_librispeech_100_composes_with_the_zoo_hyperparameters(libri_root):
    r = cfg_job("experiment=librispeech_100", f"dataset.root={libri_root}")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = yaml.safe_load(r.stdout)
    d, m, o, t = cfg["dataset"], cfg["model"], cfg["optimizer"], cfg["trainer"]
    assert d["source"] == "librispeech" and d["train_subsets"] == ["train-clean-100"]
    assert d["val_subsets"] == ["dev-clean"] and d["test_subsets"] == ["test-clean"]
    assert d["batch_size"] == 20 and d["max_duration"] == 15.0 and d["drop_infeasible"] is True
    assert d["feature"]["window"] == "hamming" and d["spec_augment"]["enabled"] is False
    assert (m["name"], m["rnn_layers"], m["rnn_hidden"], m["activation"]) == ("ds2_reference", 5, 1024, "tanh")
    assert o["name"] == "adam" and o["lr"] == 3e-4 and o["eps"] == pytest.approx(1e-5 * 1024)
    assert o["grad_clip"] == 400.0 and o["schedule"] == "exponential" and o["anneal"] == 1.1
    assert o["warmup_steps"] > 0 and t["max_epochs"] == 70


def test_finetune_zoo_needs_a_checkpoint_and_takes_an_old_flat_one(libri_root, tmp_path):
    """Without a checkpoint: exit 2 naming pretrained=. With a MindSpore <= 1.5 (flat RNN.weightN)
    checkpoint of the model: the preflight's fit check converts it and the recipe composes (a ds2_tiny
    checkpoint keeps the test small; the conversion is shape-generic)."""
    import mindspore as ms

    from ds2exp.models.deepspeech2 import DeepSpeech2
    from tests.helpers.models import cudnn_flat

    r = cfg_job("experiment=finetune_zoo", f"dataset.root={libri_root}", f"paths.data_dir={tmp_path}")
    assert r.returncode == 2
    assert "pretrained=" in r.stderr and "zoo/DeepSpeech2.ckpt" in r.stderr
    net = DeepSpeech2(conv_channels=8, activation="hardtanh", rnn_layers=2, rnn_hidden=192, conv_impl="plain",
                      rnn_impl="plain")  # model=ds2_tiny
    params = {n: p.asnumpy() for n, p in net.parameters_and_names()}
    entries = [{"name": n, "data": ms.Tensor(v)} for n, v in params.items() if not n.startswith("RNN.lstms.")]
    entries += [{"name": f"RNN.weight{i}", "data": ms.Tensor(cudnn_flat(params, i))} for i in range(2)]
    ckpt = tmp_path / "DeepSpeech2_ms15.ckpt"
    ms.save_checkpoint(entries, str(ckpt))
    r = cfg_job("experiment=finetune_zoo", f"dataset.root={libri_root}", f"pretrained={ckpt}", "model=ds2_tiny")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = yaml.safe_load(r.stdout)
    assert cfg["pretrained"] == str(ckpt) and cfg["model"]["name"] == "ds2_tiny"
    assert cfg["optimizer"]["lr"] < 3e-4 and cfg["optimizer"]["schedule"] == "warmup_cosine"
    assert cfg["dataset"]["feature"]["window"] == "hamming" and cfg["dataset"]["sortagrad"] is False
