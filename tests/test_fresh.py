"""Large results on huge pages (structure/fresh.py): the advice reaches whole pages inside the tensor only, small
tensors are left alone, and the kernel records it on the mapping."""

import pytest
import torch

from optmech.structure import fresh


def test_large_tensors_are_advised_over_whole_pages_inside_their_bytes(monkeypatch):
    calls = []
    monkeypatch.setattr(fresh, "_madvise", lambda: lambda start, length, advice: calls.append((start, length, advice)) or 0)
    small = fresh.empty((4, 10, 10), torch.float32, torch.device("cpu"))
    assert calls == [] and small.shape == (4, 10, 10)
    big = fresh.empty((9, 1000, 1000), torch.float64, torch.device("cpu"))
    assert big.shape == (9, 1000, 1000) and big.dtype == torch.float64
    ((start, length, advice),) = calls
    page, begin, end = fresh._PAGE, big.data_ptr(), big.data_ptr() + big.numel() * 8
    assert advice == 14 and start % page == 0 and length % page == 0
    assert begin <= start < begin + page and end - page < start + length <= end


def test_no_advice_where_the_machine_takes_none(monkeypatch):
    monkeypatch.setattr(fresh, "_madvise", lambda: None)
    out = fresh.empty((9, 1000, 1000), torch.float32, torch.device("cpu"))
    assert out.shape == (9, 1000, 1000) and not fresh.huge_pages_advised()


@pytest.mark.skipif(not fresh.huge_pages_advised(), reason="transparent huge pages are not in madvise mode here")
def test_the_kernel_records_the_advice_on_the_tensors_mapping():
    out = fresh.empty((fresh.MIN_BYTES // 4 + 1,), torch.float32, torch.device("cpu"))
    address, flags = out.data_ptr() + out.numel() * 2, None
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                flags = line.split()[1:]
                break
    assert flags is not None and "hg" in flags  # hg: MADV_HUGEPAGE on this mapping
