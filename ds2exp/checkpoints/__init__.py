"""Checkpoints and the run directory that holds them.

- `names`: a run directory's file names (`RunDir`); imports nothing of ds2exp and no MindSpore.
- `io`: write, read and verify a checkpoint (model, optimizer state, training position, config).
- `best`: how best checkpoints are named, and which one of a run is the best and why.
- `loading`: a model from a checkpoint, a run directory or an MLflow run id.
"""
