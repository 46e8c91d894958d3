"""RNN layers for graphs that keep the batch and the time axis free: what an exported model runs.

`GraphRNN` computes what the model's RNN layers compute (`ds2exp.models.make_rnn`: forward direction
first, the reverse one starting at each row's last valid frame, zeros at padded frames) from the same
parameters, with ops that MindSpore can compile for any batch size and any number of frames:

- LSTM: MindSpore's fused LSTM kernel once per direction; the reverse direction runs over each row
  reversed within its own length (ReverseSequence).
- GRU: a loop over time that stays a loop in the graph, GRU_UNROLL steps per pass (there is no fused
  GRU kernel on CPU).

nn.LSTM and nn.GRU, called with sequence lengths, step through time in a Python loop that graph
compilation unrolls, which fixes the graph to one input length.
"""
from __future__ import annotations

from typing import Dict

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn, ops

from ds2exp.kernels import tanh_fit

__all__ = ["GraphRNN", "accurate_sigmoid", "accurate_tanh", "use_graph_rnns"]

# MindSpore 2.8's CPU Tanh kernel is off by up to 1e-4 (measured over [-12, 12]: tanh(-5) = -1, where
# float32 holds -0.9999092), and its Sigmoid by up to 8.4e-7 (at x = 0.35; it is 1 / (1 + exp(-x)), and
# its Exp kernel is up to 7e-6 off relatively), where the compiled recurrences' sigmoid is within 1.6e-7.
# In the layers of a trained ds2_tiny_gru, on the same float32 input projections, a graph GRU with
# MindSpore's Sigmoid in its gates was 2.0-2.4e-6 off a float64 GRU, the compiled recurrence 0.7-1.2e-6.
# So the GRU graph computes both activations as the compiled recurrences do (kernels/tanh_fit.py, written
# with MindSpore's elementwise ops): tanh by the rational fit, sigmoid(x) = 0.5 tanh(0.5 x) + 0.5 - within
# 0.9-1.2e-6 of float64 in those layers. The fit in the gates costs the exported GRU about 12-15% of its
# time (800 frames, measured side by side). The fused LSTM kernel is accurate (its outputs within 2e-6 of
# the compiled recurrences').
GRU_UNROLL = 8  # GRU steps per pass of the graph's loop


def accurate_tanh(x):
    return tanh_fit.rational_tanh(ops.clamp(x, -tanh_fit.CLAMP, tanh_fit.CLAMP))


def accurate_sigmoid(x):
    """sigmoid as the compiled recurrences compute it (kernels/compiled.py: 0.5 tanh(0.5 x) + 0.5)."""
    return accurate_tanh(x * 0.5) * 0.5 + 0.5


class GraphRNN(nn.Cell):
    """One (bi)directional LSTM/GRU layer as the model's RNN layers compute it - `(x (B, T, In),
    lengths (B,)) -> (B, T, D*hidden)`, forward direction first, the reverse one starting at each
    row's last valid frame, zeros at padded frames - with ops that keep T and B free in a graph."""

    _NAMES = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")

    def __init__(self, rnn_type: str, hidden: int, bidirectional: bool, params: Dict[str, np.ndarray]):
        super().__init__()
        self.is_lstm = rnn_type == "lstm"
        self.hidden = hidden
        self.bidirectional = bidirectional
        suffixes = ("", "_reverse") if bidirectional else ("",)
        for sfx in suffixes:
            for n in self._NAMES:
                setattr(self, n + sfx, Parameter(ms.Tensor(params[n + sfx].astype(np.float32)), name=n + sfx))
        input_size = params["weight_ih_l0"].shape[1]
        self.reverse = ops.ReverseSequence(seq_dim=0, batch_dim=1)
        self.matmul_t = ops.MatMul(transpose_b=True)  # 2-D: MatMulExt warns on dynamic shapes
        if self.is_lstm:
            self.lstm = ops.LSTM(input_size, hidden, 1, True, False, 0.0)

    @classmethod
    def like(cls, cell) -> "GraphRNN":
        """A GraphRNN with the parameter values of one of the model's RNN layers."""
        params = {name.rsplit(".", 1)[-1]: p.asnumpy() for name, p in cell.parameters_and_names()}
        return cls(cell.rnn_type, cell.hidden_size, cell.num_directions == 2, params)

    def _lstm(self, x, w_ih, w_hh, b_ih, b_hh):
        # the CPU kernel's weight layout: W_ih, W_hh, then one bias (as nn.LSTM passes it on CPU)
        w = ops.concat((w_ih.reshape(-1, 1, 1), w_hh.reshape(-1, 1, 1), (b_ih + b_hh).reshape(-1, 1, 1)))
        h0 = ops.zeros((1, x.shape[1], self.hidden), x.dtype)
        out, _, _, _, _ = self.lstm(x, h0, h0, w)
        return out

    def _gru(self, x, w_ih, w_hh, b_ih, b_hh):
        # gates r, z, n as nn.GRU: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = n + z * (h - n).
        # Each pass of the loop runs GRU_UNROLL steps: MindSpore's graph loops cost about as much per
        # pass as a step's arithmetic (measured), so the time axis is padded to a multiple of it.
        H, K = self.hidden, GRU_UNROLL
        steps, batch, size = x.shape[0], x.shape[1], x.shape[2]
        blocks = (steps + K - 1) // K
        x = ops.concat((x, ops.zeros((blocks * K - steps, batch, size), x.dtype)))
        xp = (self.matmul_t(x.reshape(-1, size), w_ih) + b_ih).reshape(blocks, K, batch, 3 * H)
        h = ops.zeros((batch, H), x.dtype)
        out = ops.zeros((blocks, K, batch, H), x.dtype)
        i = ms.Tensor(0, ms.int32)
        end = ops.scalar_to_tensor(blocks, ms.int32)
        while i < end:
            block = ops.gather(xp, i, 0)  # (K, B, 3H)
            hs = []
            for k in range(K):
                gx = block[k]
                gh = self.matmul_t(h, w_hh) + b_hh
                rz = accurate_sigmoid(gx[:, :2 * H] + gh[:, :2 * H])
                n = accurate_tanh(gx[:, 2 * H:] + rz[:, :H] * gh[:, 2 * H:])
                h = n + rz[:, H:] * (h - n)
                hs.append(h)
            out = ops.tensor_scatter_update(out, i.reshape(1, 1), ops.expand_dims(ops.stack(hs), 0))
            i = i + 1
        return out.reshape(blocks * K, batch, H)[:steps]

    def _direction(self, x, w_ih, w_hh, b_ih, b_hh):
        if self.is_lstm:
            return self._lstm(x, w_ih, w_hh, b_ih, b_hh)
        return self._gru(x, w_ih, w_hh, b_ih, b_hh)

    def construct(self, x, lengths):
        x = x.transpose(1, 0, 2)  # (T, B, In)
        lengths = lengths.astype(ms.int32)
        valid = ops.arange(x.shape[0]).reshape(-1, 1) < lengths.reshape(1, -1)
        mask = ops.expand_dims(valid.astype(x.dtype), -1)  # (T, B, 1)
        out = self._direction(x, self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0) * mask
        if self.bidirectional:
            back = self._direction(self.reverse(x, lengths), self.weight_ih_l0_reverse, self.weight_hh_l0_reverse,
                                   self.bias_ih_l0_reverse, self.bias_hh_l0_reverse)
            out = ops.concat((out, self.reverse(back, lengths) * mask), -1)
        return out.transpose(1, 0, 2)



def use_graph_rnns(model):
    """Replace each RNN layer of a DeepSpeech2 model by a GraphRNN with its parameter values (in place:
    the parameter names stay the model's)."""
    layers = model.rnn_stack.lstms
    for i in range(len(layers)):
        layers[i] = GraphRNN.like(layers[i])
    model.set_train(False)
    return model
