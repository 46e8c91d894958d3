"""ds2exp's Optuna sweeper for Hydra (`hydra/sweeper=ds2exp_optuna`; the preset `+sweep=optuna_lr`).

Hydra finds sweepers by importing every module of the `hydra_plugins` namespace package; this one is
shipped in ds2exp's distribution (setup.cfg). The search itself is ds2exp/sweeps/optuna_search.py.
"""
