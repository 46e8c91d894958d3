"""Hydra sweeps: what each job did and what the sweep found.

- `names`: a job's readable name from its swept overrides (`lr=1e-3 bs=8`), the `jobs.csv` index.
- `jobs`: read a sweep from its directory or from its MLflow parent run (one `Job` per job).
- `judge`: diverged or not (the run's own tags/summary, else its logged losses) and the verdict:
  the stability boundary per batch size and the recommended setting.
- `render`: the report text, the lr x batch-size heatmap and the per-job loss curves.
- `report`: load, judge, write and log a sweep's report; `python -m ds2exp.sweeps.report` runs it by hand.
- `callback`: the Hydra callback of every `-m` run: the MLflow parent run, the report at the end.
- `job_runner`: one sweep job (a crash or divergence is recorded and the sweep goes on).
- `job_process`: a job in a launcher's worker behaves like a plain run.
- `optuna_search`: the Optuna search of `+sweep=optuna_lr` (the sweeper in hydra_plugins/ds2exp_optuna_sweeper):
  its study in an RDB store, resumed and shared, trials pruned, failed with their cause.
"""
