"""Per-key merge context: the key, the seed and the device-independent random source.

Random masks are drawn from a CPU ``torch.Generator`` seeded from (seed, a stable hash of the key)
and then moved to the compute device.  That makes them identical on CPU and GPU, identical whatever
the order keys are merged in, and independent between keys.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch


def key_seed(seed: int, key: str) -> int:
    """A stable 63-bit seed for (seed, key); never Python's salted ``hash``."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class MergeContext:
    key: str = ""
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: host-side (Python list) values of the per-model parameters, for methods that need counts
    host: Dict[str, List[Any]] = field(default_factory=dict)
    _gen: Optional[torch.Generator] = field(default=None, repr=False)

    @property
    def generator(self) -> torch.Generator:
        if self._gen is None:
            self._gen = torch.Generator(device="cpu")
            self._gen.manual_seed(key_seed(self.seed, self.key))
        return self._gen

    def uniform(self, shape: Sequence[int]) -> torch.Tensor:
        """Uniform [0, 1) fp32 numbers of ``shape`` on the compute device, drawn on the CPU."""
        u = torch.rand(tuple(shape), generator=self.generator, dtype=torch.float32)
        return u.to(self.device, non_blocking=False)

    def bernoulli(self, p: torch.Tensor | float, shape: Sequence[int]) -> torch.Tensor:
        """A boolean keep-mask: True with probability ``p`` (broadcast to ``shape``)."""
        return self.uniform(shape) < p
