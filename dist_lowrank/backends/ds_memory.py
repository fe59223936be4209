"""Peak resident memory *during* one operation, for the switch measurements.

`ru_maxrss` is the process's lifetime peak: after training it is usually above anything the switch
does, so its growth reads 0 and says nothing. A sampler thread reads the current RSS every few
milliseconds instead (torch kernels release the GIL, so it sees their allocations).
"""
from __future__ import annotations

import threading
from types import TracebackType
from typing import Optional

import psutil

MB = 1024.0 * 1024.0


class RssPeak:
    """`with RssPeak() as peak: ...` then `peak.delta_mb` = highest RSS seen − RSS at entry (MiB)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.start_mb = self.peak_mb = 0.0

    def _rss_mb(self) -> float:
        return self._process.memory_info().rss / MB

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def __enter__(self) -> "RssPeak":
        self.start_mb = self.peak_mb = self._rss_mb()
        self._thread = threading.Thread(target=self._sample, name="rss-peak", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss_mb())

    @property
    def delta_mb(self) -> float:
        return self.peak_mb - self.start_mb
