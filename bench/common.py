"""What the benchmark scripts share: a loop device over an image, reserved hugepages,
sparse images. Scripts run as `python bench/NAME.py`, so this imports as `common`."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[str]:
    device = subprocess.run(
        ["losetup", "--direct-io=on", "--sector-size", "4096", "-f", "--show", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=True)


@contextlib.contextmanager
def hugepages_reserved(extra_pages: int) -> Iterator[None]:
    path = Path("/proc/sys/vm/nr_hugepages")
    before = int(path.read_text())
    path.write_text(str(before + extra_pages))
    try:
        reserved = int(path.read_text()) - before
        if reserved < extra_pages:
            print(f"warning: only {reserved} of {extra_pages} hugepages could be reserved")
        yield
    finally:
        path.write_text(str(before))


def make_image(path: Path, size_bytes: int) -> None:
    with open(path, "wb") as file:
        file.truncate(size_bytes)
