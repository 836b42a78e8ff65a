"""Peak resident memory of this process while a block runs: the benchmarks' memory figure."""
from __future__ import annotations

import threading
import time


class PeakRSS:
    """``with PeakRSS() as rss:`` samples the RSS every ``interval`` seconds in a thread; afterwards
    ``rss.base`` is the RSS just before the block, ``rss.peak`` the highest seen (at least the RSS at its
    end) and ``rss.extra_gb`` their difference in GiB."""

    def __init__(self, interval: float = 0.005):
        import psutil
        self.proc = psutil.Process()
        self.interval = interval
        self.base = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra_gb(self) -> float:
        return (self.peak - self.base) / 2**30
