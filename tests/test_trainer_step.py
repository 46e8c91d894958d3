"""The training step itself, in process, on real MindSpore and real synthesised audio."""
import math

import mindspore as ms
import numpy as np
import pytest
from omegaconf import OmegaConf

from ds2exp.cli import check_overrides
from ds2exp.data.dataset import BatchLoader, BucketBatchSampler, load_split
from ds2exp.data.features import FeatureCache, FeatureSettings
from ds2exp.data.manifest import Utterance, write_jsonl
from ds2exp.models.ctc import ctc_losses
from ds2exp.models.deepspeech2 import build_model
from ds2exp.tracking.mlflow_tracker import NullTracker
from ds2exp.training.optim import build_optimizer, set_learning_rate
from ds2exp.training.trainer import Trainer
from tests.helpers import write_flac


@pytest.fixture(scope="module")
def batch_and_cfg(tmp_path_factory, say):
    import soundfile as sf

    tmp = tmp_path_factory.mktemp("step")
    utts = []
    for i, text in enumerate(["GOOD MORNING", "OPEN THE DOOR", "THE BLUE CAR", "HELLO THERE"]):
        p = write_flac(tmp / f"u{i}.flac", say(text.lower()))
        utts.append(Utterance(f"u{i}", str(p), text, sf.info(str(p)).duration, 16000))
    write_jsonl(utts, tmp / "m.jsonl")
    cfg = check_overrides(["dataset=manifest", f"dataset.train_manifest={tmp / 'm.jsonl'}", f"paths.root_dir={tmp}",
                           "model.conv_channels=4", "model.rnn_hidden=48", "model.rnn_layers=1",
                           "optimizer.lr=3e-3", "logger=none", "trainer.progress=false"])
    split = load_split("train", [tmp / "m.jsonl"], cfg, FeatureSettings())
    sampler = BucketBatchSampler(split.examples, 4, 1, seed=0)
    loader = BatchLoader(split, sampler, FeatureCache(tmp / "cache", FeatureSettings()), num_workers=1)
    batch = loader.make_batch(list(range(4)))
    return cfg, loader, batch, tmp


def make_trainer(cfg, loader, tmp):
    ms.set_seed(0)
    model = build_model(cfg.model)
    opt = build_optimizer(model.trainable_params(), cfg.optimizer)
    set_learning_rate(opt, float(cfg.optimizer.lr))
    trainer = Trainer(cfg, model, opt, loader, None, NullTracker(), tmp / "run", steps_per_epoch=1)
    model.set_train(True)
    return trainer, model


def test_tiny_model_overfits_one_batch(batch_and_cfg):
    cfg, loader, batch, tmp = batch_and_cfg
    trainer, _ = make_trainer(cfg, loader, tmp)
    losses = [trainer.train_step(batch).loss for _ in range(60)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_grad_norm_matches_independent_recomputation(batch_and_cfg):
    cfg, loader, batch, tmp = batch_and_cfg
    trainer, model = make_trainer(cfg, loader, tmp)
    params = model.trainable_params()
    before = [p.asnumpy().copy() for p in params]
    stats = {n: p.asnumpy().copy() for n, p in model.parameters_and_names() if "moving_" in n}

    # independent: MindSpore's ms.grad of the plain mean CTC loss, norm summed in float64 by numpy
    def loss_fn(x, xl, y, yl):
        logits, ol = model(x, xl)
        return ctc_losses(logits, ol, y, yl).mean()

    grads = ms.grad(loss_fn, None, params)(ms.Tensor(batch.features), ms.Tensor(batch.feature_lengths),
                                           ms.Tensor(batch.labels), ms.Tensor(batch.label_lengths))
    expected = math.sqrt(sum(float(np.sum(g.asnumpy().astype(np.float64) ** 2)) for g in grads))
    for n, p in model.parameters_and_names():  # undo the BatchNorm statistics update of that forward pass
        if n in stats:
            p.set_data(ms.Tensor(stats[n]))
    result = trainer.train_step(batch)
    assert result.finite
    assert result.grad_norm == pytest.approx(expected, rel=1e-5)
    assert sum(v ** 2 for v in result.group_norms.values()) == pytest.approx(expected ** 2, rel=1e-5)
    assert any(not np.array_equal(b, p.asnumpy()) for b, p in zip(before, params))  # the update happened


def test_clipping_bounds_the_update(batch_and_cfg):
    cfg, loader, batch, tmp = batch_and_cfg
    cfg = cfg.copy()
    cfg.optimizer.name = "sgd"
    cfg.optimizer.momentum = 0.0
    cfg.optimizer.nesterov = False
    cfg.optimizer.weight_decay = 0.0
    cfg.optimizer.grad_clip = 1e-3
    trainer, model = make_trainer(cfg, loader, tmp)
    params = model.trainable_params()
    before = [p.asnumpy().astype(np.float64) for p in params]
    result = trainer.train_step(batch)
    delta = math.sqrt(sum(float(np.sum((p.asnumpy() - b) ** 2)) for p, b in zip(params, before)))
    assert result.grad_norm > 1e-3
    # SGD step = lr * clipped norm (float32 weights round the tiny update: 2% tolerance)
    assert delta == pytest.approx(float(cfg.optimizer.lr) * 1e-3, rel=2e-2)


def test_graph_mode_step_equals_the_pynative_step(batch_and_cfg):
    """hardware.mode=graph compiles value_and_grad (Custom ops inside) and pads labels to the bucket's
    longest transcript: the same losses, gradient norms and weights as the PYNATIVE step, step by step."""
    cfg, loader, batch, tmp = batch_and_cfg
    graph_cfg = OmegaConf.merge(cfg, {"hardware": {"mode": "graph"}})
    padded_loader = BatchLoader(loader.split, loader.sampler, loader.cache, num_workers=1, fixed_label_length=True)
    padded = padded_loader.make_batch(list(range(4)))
    longest = max(len(e.labels) for e in loader.split.examples)
    assert padded.labels.shape[1] == longest and np.array_equal(padded.label_lengths, batch.label_lengths)
    eager, eager_model = make_trainer(cfg, loader, tmp)
    graph, graph_model = make_trainer(graph_cfg, padded_loader, tmp / "graph")
    assert getattr(graph.grad_fn, "__wrapped__", None) is not None  # mindspore.jit's wrapper
    assert getattr(eager.grad_fn, "__wrapped__", None) is None
    for _ in range(3):
        a, b = eager.train_step(batch), graph.train_step(padded)
        assert a.good and b.good
        assert abs(a.loss - b.loss) <= 1e-5 * abs(a.loss), (a.loss, b.loss)
        assert abs(a.grad_norm - b.grad_norm) <= 1e-4 * a.grad_norm, (a.grad_norm, b.grad_norm)
    for (name, p), q in zip(eager_model.parameters_and_names(), graph_model.get_parameters()):
        np.testing.assert_allclose(p.asnumpy(), q.asnumpy(), rtol=1e-4, atol=1e-6, err_msg=name)
