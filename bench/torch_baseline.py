"""The PyTorch baseline of the step bench: the same DeepSpeech2 in PyTorch (conv + BN + activation
with the frame mask, packed bidirectional nn.LSTM with directions summed, Linear without bias,
nn.CTCLoss(blank=28), Adam, clip_grad_norm_), fp32, ``torch.set_num_threads`` as the ds2exp row."""
from __future__ import annotations

from typing import Any, Dict, List

from bench.flops import BLANK, NUM_CLASSES, conv_shapes, model_arch, synthetic_batch
from bench.timing import median, timed_steps, timeit


def torch_model(arch):
    import torch
    from torch import nn

    c = int(arch["conv_channels"])
    _, _, f2, _ = conv_shapes(100)
    act = {"hardtanh": lambda: nn.Hardtanh(0, 20), "tanh": nn.Tanh, "relu": nn.ReLU}[str(arch["activation"])]
    h = int(arch["rnn_hidden"])
    bidir = bool(arch["bidirectional"])
    if str(arch["rnn_type"]) != "lstm":
        raise ValueError("the PyTorch baseline is written for LSTM models")
    merge_sum = bidir and arch["merge"] == "sum"

    class DS2(nn.Module):
        def __init__(self):
            super().__init__()
            # two conv stages, each masked past the output length afterwards (as ds2exp's ConvBlock)
            first = [nn.Conv2d(1, c, (41, 11), (2, 2), (20, 5), bias=False)]
            second = [nn.Conv2d(c, c, (21, 11), (2, 1), (10, 5), bias=False)]
            if arch["batch_norm"]:
                first.append(nn.BatchNorm2d(c))
                second.append(nn.BatchNorm2d(c))
            self.conv1 = nn.Sequential(*first, act())
            self.conv2 = nn.Sequential(*second, act())
            size = c * f2
            self.rnns = nn.ModuleList()
            for _ in range(int(arch["rnn_layers"])):
                self.rnns.append(nn.LSTM(size, h, bidirectional=bidir))
                size = h if (merge_sum or not bidir) else 2 * h
            self.fc = nn.Linear(size, NUM_CLASSES, bias=False)

        def forward(self, x, lengths):
            out_len = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
            x = self.conv1(x.unsqueeze(1))
            mask = (torch.arange(x.shape[-1])[None, :] < out_len[:, None]).to(x.dtype)[:, None, None, :]
            x = self.conv2(x * mask) * mask  # (B, C, F', T')
            b, ch, f, t = x.shape
            x = x.view(b, ch * f, t).permute(2, 0, 1).contiguous()  # (T', B, C*F')
            for rnn in self.rnns:
                packed = nn.utils.rnn.pack_padded_sequence(x, out_len, enforce_sorted=False)
                x, _ = rnn(packed)
                x, _ = nn.utils.rnn.pad_packed_sequence(x, total_length=t)
                if merge_sum:
                    x = x[..., :h] + x[..., h:]
            return self.fc(x), out_len  # (T', B, classes)

    return DS2()


def child_torch(args) -> Dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    arch = model_arch(args.model)
    model = torch_model(arch)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    ctc = torch.nn.CTCLoss(blank=BLANK, reduction="none")
    x, xl, y, yl = (torch.from_numpy(a) for a in synthetic_batch(args.batch, args.frames))
    xl, yl, y = xl.long(), yl.long(), y.long()
    losses: List[float] = []

    def step():
        opt.zero_grad(set_to_none=True)
        logits, ol = model(x, xl)
        loss = ctc(logits.log_softmax(-1), y, ol, yl).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 400.0)
        opt.step()
        losses.append(float(loss.detach()))

    ts, warm = timed_steps(args, step)
    n = args.gemm_n
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timeit(lambda: a @ b) for _ in range(3))
    return {"s": median(ts), "times": ts, "warmup_s": warm, "loss": losses[-1], "torch": torch.__version__,
            "params": sum(p.numel() for p in model.parameters()), "gemm_gflops": 2.0 * n ** 3 / best / 1e9}

