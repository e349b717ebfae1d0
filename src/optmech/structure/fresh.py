"""Large result tensors in memory backed by transparent huge pages where the kernel offers them.

The engine returns A (batch, C, C) in a new tensor each call: at C = 1000 and batch 64 that is 244 MiB that no
other tensor has touched, and its first write takes one page fault per 4 KiB page (62,500 faults, each
zeroing its page). On Linux with transparent huge pages in ``madvise`` mode, :func:`empty` marks the new
tensor's memory ``MADV_HUGEPAGE`` before anything writes to it, so the kernel backs it with 2 MiB pages:
the same bytes in 1/512 of the faults (docs/engine.md: writing A into fresh memory 2–3× faster, and the GEMM
that forms A no slower than into kept memory). The values are untouched; only who zeroes the pages
changes.

Only CPU tensors of at least :data:`MIN_BYTES` (32 MiB: glibc serves allocations that large with their own
``mmap``, so the advice never reaches memory shared with other allocations), only where
``/sys/kernel/mm/transparent_hugepage/enabled`` reads ``[madvise]`` (``[always]`` needs no advice,
``[never]`` refuses it), and only when ``madvise`` can be called; otherwise a plain ``torch.empty``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

import torch

__all__ = ["empty", "MIN_BYTES", "huge_pages_advised"]

#: smallest allocation advised (glibc's largest dynamic mmap threshold: anything this large has its own mapping)
MIN_BYTES = 32 * 2**20
_MADV_HUGEPAGE = 14  # linux/mman.h
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.lru_cache(maxsize=1)
def _madvise():
    """libc's ``madvise`` when transparent huge pages are in ``madvise`` mode on this machine, else None."""
    try:
        with open(_THP_MODE) as f:
            if "[madvise]" not in f.read():
                return None
        name = ctypes.util.find_library("c")
        fn = ctypes.CDLL(name, use_errno=True).madvise if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def huge_pages_advised() -> bool:
    """Whether :func:`empty` advises huge pages on this machine."""
    return _madvise() is not None


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, its memory advised ``MADV_HUGEPAGE`` when it is a CPU
    tensor of at least :data:`MIN_BYTES` on a machine that takes the advice (see the module's docstring)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    if out.device.type != "cpu" or nbytes < MIN_BYTES:
        return out
    advise = _madvise()
    if advise is not None:
        start = -(-out.data_ptr() // _PAGE) * _PAGE  # whole pages inside the tensor's bytes
        end = (out.data_ptr() + nbytes) // _PAGE * _PAGE
        advise(start, end - start, _MADV_HUGEPAGE)  # advice only: a refusal leaves ordinary pages
    return out
