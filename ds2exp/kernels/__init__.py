"""Host-side numpy/numba kernels of DeepSpeech2's fast layers; no MindSpore here.

``settings`` (kernels/settings.py) holds what they may use (numba on/off, worker threads) and the
timing hook; ``rnn`` the LSTM/GRU recurrences, ``conv`` the convolution pieces, ``compiled`` the
numba kernels. ds2exp.models.layers wraps them in MindSpore Custom ops.
"""
from ds2exp.kernels.settings import HAVE_NUMBA, KernelSettings, set_numba_enabled, set_threads, settings

__all__ = ["HAVE_NUMBA", "KernelSettings", "set_numba_enabled", "set_threads", "settings"]
