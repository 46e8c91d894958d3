"""Small DeepSpeech2 models built in the test process, and weights in the model zoo's flat cuDNN layout."""
from __future__ import annotations

import numpy as np


def tiny_model(**kw):
    """A DeepSpeech2 of 2 conv channels and one 8-unit RNN layer on the plain kernels; `kw` changes any argument."""
    from ds2exp.models.deepspeech2 import DeepSpeech2

    args = dict(conv_channels=2, rnn_layers=1, rnn_hidden=8, conv_impl="plain", rnn_impl="plain")
    args.update(kw)
    return DeepSpeech2(**args)


def cudnn_flat(params, layer):
    """Written from the layout alone: per direction (forward, reverse) W_ih, W_hh, b_ih, b_hh, row-major."""
    parts = []
    for sfx in ("", "_reverse"):
        for base in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            parts.append(params[f"RNN.lstms.{layer}.{base}{sfx}"].reshape(-1))
    return np.concatenate(parts).reshape(-1, 1, 1)
