"""The loaders a command trains or scores on, built from the dataset config: manifests (a synthetic
corpus built and LibriSpeech prepared on first use), splits, the feature cache and length-bucketed batches."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from ds2exp.data.dataset import BatchLoader, BucketBatchSampler, DatasetError, load_split, resolve_manifests
from ds2exp.data.features import FeatureCache, FeatureSettings


def build_data(cfg, run_dir: Optional[Path] = None, need_test: bool = False, rank: int = 0, world: int = 1,
               fixed_label_length: bool = False) -> Dict[str, Any]:
    """Loaders for train/val(/test). Data parallel: rank `rank` of `world` gets its shard of every
    epoch's training batches, and only rank 0 (the one that validates) gets the val loader.
    `fixed_label_length`: a step compiled per batch shape (hardware.mode=graph) wants one label width per
    bucket."""
    d = cfg.dataset
    settings = FeatureSettings.from_config(d.feature)
    cache = FeatureCache(cfg.paths.cache_dir, settings, enabled=d.feature.cache,
                         max_gb=d.feature.cache_max_gb)
    manifests = resolve_manifests(cfg, progress=cfg.trainer.progress)
    out: Dict[str, Any] = {"settings": settings, "cache": cache, "manifests": manifests}
    for split in ("train", "val", "test"):
        if not manifests.get(split) or (split == "test" and not need_test) or (split != "train" and rank > 0):
            out[split] = None
            continue
        data = load_split(split, manifests[split], cfg, settings, report_dir=run_dir)
        if not data.examples:
            raise DatasetError(f"the {split} split is empty after filtering (manifests: "
                               f"{', '.join(map(str, manifests[split]))}; dropped: {data.drop_counts()})")
        train = split == "train"
        sampler = BucketBatchSampler(data.examples, d.batch_size, d.num_buckets, cfg.trainer.seed,
                                     sortagrad=train and d.sortagrad, rank=rank if train else 0,
                                     world=world if train else 1)
        out[split] = BatchLoader(data, sampler, cache, d.num_workers,
                                 spec_augment_cfg=d.spec_augment if train else None, seed=cfg.trainer.seed,
                                 fixed_label_length=train and fixed_label_length,
                                 crop_frames=d.crop_frames if train else None, label_pad=d.label_pad if train else None)
    return out
