"""A benchmark job, described the way fio describes one, so the same job can be handed
to ctxkv and to fio and the two compared like for like."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

RW_MODES = ("read", "write", "randread", "randwrite")

_SIZE_PATTERN = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b?)?\s*$", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50}


def parse_size(text: str) -> int:
    """fio's size syntax with its default kb_base=1024: 4k = 4096, 4M = 4 MiB, 1g = 1 GiB."""
    match = _SIZE_PATTERN.match(text)
    if not match:
        raise ValueError(f"cannot read {text!r} as a size (examples: 4096, 4k, 4M, 1G)")
    return int(match.group(1)) << _SIZE_SHIFT[match.group(2).lower()]


def format_size(nbytes: int) -> str:
    """The shortest exact fio spelling: 4194304 -> 4M."""
    for suffix, shift in (("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if nbytes and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift}{suffix}"
    return str(nbytes)


@dataclass(frozen=True)
class Job:
    """What to run. size is per job thread and spread evenly over the targets (as fio
    does); with time_based the job repeats its region until runtime_s has passed."""

    targets: tuple[str, ...]
    rw: str = "read"
    block_bytes: int = 4 << 20
    iodepth: int = 8
    numjobs: int = 1
    size_bytes: int | None = None  # None: the whole of the smallest target
    runtime_s: float | None = None  # None: until size_bytes is done
    time_based: bool = False
    name: str = "ctxkv"
    extra: dict[str, str] = field(default_factory=dict)  # more fio options (fio side only)
    # How ctxkv reaches NVMe namespaces (engine.nvme.passthru.IO_PATHS); on passthru, fio
    # runs its io_uring_cmd engine on the namespaces' char devices.
    io_path: str = "auto"

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("a job needs at least one target")
        if self.rw not in RW_MODES:
            raise ValueError(f"rw must be one of {', '.join(RW_MODES)}, got {self.rw!r}")
        if self.block_bytes <= 0:
            raise ValueError(f"bs must be positive, got {self.block_bytes}")
        if not 1 <= self.iodepth <= 4096:
            raise ValueError(f"iodepth must be in 1..4096, got {self.iodepth}")
        if not 1 <= self.numjobs <= 64:
            raise ValueError(f"numjobs must be in 1..64, got {self.numjobs}")
        if self.size_bytes is not None and self.size_bytes < self.block_bytes * len(self.targets):
            raise ValueError(
                f"size {self.size_bytes} is smaller than one block of {self.block_bytes} bytes "
                f"per target"
            )
        if self.runtime_s is not None and self.runtime_s <= 0:
            raise ValueError(f"runtime must be positive, got {self.runtime_s}")
        if self.time_based and self.runtime_s is None:
            raise ValueError("time_based needs a runtime")

    @property
    def is_read(self) -> bool:
        return self.rw in ("read", "randread")

    @property
    def is_random(self) -> bool:
        return self.rw.startswith("rand")

    @property
    def direction(self) -> str:
        """The fio JSON section this job fills: "read" or "write"."""
        return "read" if self.is_read else "write"
