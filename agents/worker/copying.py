"""Copying tensors into the module's weights: on CPU a plain copy, on CUDA through
pinned staging buffers and non-blocking copies on a side stream, so reading the file
and the host-to-device copy overlap (`Copier`, `CudaStager`)."""

from __future__ import annotations

from typing import Iterator

import torch

from fabric.logs import get_logger



log = get_logger("worker")


def bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 view."""
    return t.detach().reshape(-1).view(torch.uint8)


class CudaStager:
    """Host-to-device copies through pinned staging buffers on a side stream, pipelined.

    While buffer k's bytes travel to the GPU, the CPU fills buffer k+1 from the file;
    a buffer is refilled only after its previous copy's event has completed.
    """

    def __init__(self, device: torch.device, stage_bytes: int, buffers: int = 4):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.bufs = [torch.empty(stage_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(buffers)]
        self.events: list[torch.cuda.Event | None] = [None] * buffers
        self.stage = stage_bytes
        self._k = 0

    def begin(self) -> None:
        # work already queued on the default stream (requests) finishes before we write
        self.stream.wait_stream(torch.cuda.default_stream(self.device))

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        n = src.numel()
        for off in range(0, n, self.stage):
            i = self._k % len(self.bufs)
            self._k += 1
            if self.events[i] is not None:
                self.events[i].synchronize()
            m = min(self.stage, n - off)
            self.bufs[i][:m].copy_(src[off:off + m])
            with torch.cuda.stream(self.stream):
                dst[off:off + m].copy_(self.bufs[i][:m], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.stream)
                self.events[i] = ev

    def finish(self) -> None:
        self.stream.synchronize()


class Copier:
    """Copies uint8 sources (file mappings, backups) into tensors on any device."""

    def __init__(self, stage_bytes: int):
        self.stage_bytes = stage_bytes
        self._cuda: dict[torch.device, CudaStager] = {}

    def __call__(self, pairs: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        used: list[CudaStager] = []
        try:
            for src, dst in pairs:
                if dst.is_contiguous():
                    raw = bytes_of(dst)
                    if raw.is_cuda:
                        stager = self._stager(raw.device)
                        if stager not in used:
                            stager.begin()
                            used.append(stager)
                        stager.copy(src, raw)
                    else:
                        raw.copy_(src)
                else:  # rare: a strided parameter; go through an aligned typed copy
                    with torch.no_grad():
                        dst.copy_(src.clone().view(dst.dtype).view(dst.shape))
        finally:
            for stager in used:
                stager.finish()

    def _stager(self, device: torch.device) -> CudaStager:
        if device not in self._cuda:
            self._cuda[device] = CudaStager(device, self.stage_bytes)
        return self._cuda[device]
