"""Memory-layout predicates for convolution outputs (channels-last on the CPU)."""

from __future__ import annotations

import torch

__all__ = ["is_channels_last", "to_channels_last", "tappable_layout"]

#: dtypes whose Conv2d outputs the standalone ``gram`` call hands on in channels-last (CPU)
_CHANNELS_LAST_DTYPES = (torch.float32, torch.float64)


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels-last and not also contiguous (one channel or position makes both true)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def to_channels_last(z: torch.Tensor) -> bool:
    """Whether to hand the model a Conv2d output z in channels-last: a float32/float64 CPU z in another layout.

    oneDNN's CPU convolutions run their input-gradient (backward) kernels faster in channels-last
    than on NCHW tensors with few channels, and a convolution keeps the layout of its input, so one
    conversion after the first convolution carries the rest of the network (docs/engine.md). The
    values are the same; sums may round differently. Not on GPUs, where cuDNN's choices differ; not
    in the training-step capture, which must not change what the training step computes.
    """
    return z.dim() == 4 and z.dtype in _CHANNELS_LAST_DTYPES and z.device.type == "cpu" and z.shape[1] > 1 and not is_channels_last(z)



def tappable_layout(z: torch.Tensor) -> bool:
    """z is laid out so that a kept buffer of C such tensors can be built: channels-last 4-D, or contiguous."""
    return is_channels_last(z) or z.is_contiguous()

