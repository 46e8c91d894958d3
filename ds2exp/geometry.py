"""DeepSpeech2's convolution geometry, in one place: the kernel sizes, strides and paddings of its two
convolutions, and what they make of an utterance's frames and frequency bins.

Shapes are (frequency bins, time frames); paddings are (top, bottom, left, right) as MindSpore's Conv2d
takes them. conv1 halves time ('same' padding, stride 2) and conv2 keeps it, so T input frames give
(T - 1) // 2 + 1 output frames; 161 bins become 81, then 41. The data pipeline needs the frame count
too (to drop transcripts longer than the model's output), so this module imports nothing.
"""
from __future__ import annotations

CONV1_KERNEL, CONV1_STRIDE, CONV1_PADDING = (41, 11), (2, 2), (20, 20, 5, 5)
CONV2_KERNEL, CONV2_STRIDE, CONV2_PADDING = (21, 11), (2, 1), (10, 10, 5, 5)


def _out(n, kernel: int, stride: int, pad: int):
    return (n + pad - kernel) // stride + 1


def output_frames(num_frames):
    """Frames the conv stack emits for `num_frames` input frames: an int, a numpy array or a MindSpore
    tensor of them."""
    t = _out(num_frames, CONV1_KERNEL[1], CONV1_STRIDE[1], CONV1_PADDING[2] + CONV1_PADDING[3])
    return _out(t, CONV2_KERNEL[1], CONV2_STRIDE[1], CONV2_PADDING[2] + CONV2_PADDING[3])


def conv_output_bins(bins: int) -> int:
    """Frequency bins left after both convolutions (161 -> 41)."""
    f = _out(bins, CONV1_KERNEL[0], CONV1_STRIDE[0], CONV1_PADDING[0] + CONV1_PADDING[1])
    return _out(f, CONV2_KERNEL[0], CONV2_STRIDE[0], CONV2_PADDING[0] + CONV2_PADDING[1])
