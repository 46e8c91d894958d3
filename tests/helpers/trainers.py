"""A Trainer built in the test process (real MindSpore, no train.py) on a manifest such as the
`spoken_manifest` fixture's, logging nowhere unless given a tracker."""
from __future__ import annotations

import mindspore as ms
import numpy as np

from ds2exp.cli import check_overrides
from ds2exp.data.dataset import BatchLoader, BucketBatchSampler, load_split
from ds2exp.data.features import FeatureCache, FeatureSettings
from ds2exp.models.deepspeech2 import build_model
from ds2exp.tracking.mlflow_tracker import NullTracker
from ds2exp.training.optim import build_optimizer
from ds2exp.training.trainer import Trainer


def make_trainer(tmp_path, manifest, *overrides, tracker=None):
    cfg = check_overrides(["dataset=manifest", f"dataset.train_manifest={manifest}", f"paths.root_dir={tmp_path}",
                           "model.conv_channels=4", "model.rnn_hidden=48", "model.rnn_layers=1",
                           "dataset.batch_size=4", "dataset.num_buckets=1", "dataset.sortagrad=false",
                           "logger=none", "trainer.progress=false", "trainer.eval_every=1000", *overrides])
    settings = FeatureSettings()
    split = load_split("train", [manifest], cfg, settings)
    sampler = BucketBatchSampler(split.examples, 4, 1, seed=0)
    loader = BatchLoader(split, sampler, FeatureCache(tmp_path / "cache", settings), num_workers=0)
    ms.set_seed(0)
    np.random.seed(0)
    model = build_model(cfg.model)
    opt = build_optimizer(model.trainable_params(), cfg.optimizer)
    return Trainer(cfg, model, opt, loader, None, tracker or NullTracker(), tmp_path / "run", len(sampler))
