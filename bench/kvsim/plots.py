"""The three PNGs of a kvsim run (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

MiB = 1 << 20


def latency_cdf(path: Path, latencies_ms: dict[str, list[float]], fio: dict[str, float]) -> None:
    """fio: percentile (0-100) -> ms of a chunk-sized read at QD1."""
    figure, axes = plt.subplots(figsize=(8, 5))
    for name, values in latencies_ms.items():
        ordered = np.sort(values)
        axes.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), label=name)
    points = sorted(fio.items())
    axes.plot([ms for _p, ms in points], [p / 100 for p, _ms in points], "k--o", label="fio")
    axes.set_xscale("log")
    axes.set_xlabel("latency of one chunk read (ms, log scale)")
    axes.set_ylabel("fraction of chunk reads")
    axes.set_title("kvsim: chunk read latency CDF")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def extent_bandwidth(path: Path, sweep: list[dict]) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    extents = [row["extent_mib"] for row in sweep]
    for key, label, style in (
        ("ctxkv_get_mibps", "ctxkv get", "b-o"),
        ("fio_read_mibps", "fio read", "b--s"),
        ("ctxkv_put_mibps", "ctxkv put", "r-o"),
        ("fio_write_mibps", "fio write", "r--s"),
    ):
        axes.plot(extents, [row[key] for row in sweep], style, label=label)
    axes.set_xscale("log", base=2)
    axes.set_xticks(extents, [str(e) for e in extents])
    axes.set_xlabel("extent size (MiB); fio: block size, iodepth = chunk / extent")
    axes.set_ylabel("MiB/s")
    axes.set_title("bandwidth vs extent size, whole chunks, same file")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def versus_fio(path: Path, rows: list[dict], fio_read: float, fio_write: float) -> None:
    figure, axes = plt.subplots(figsize=(9, 4.8))
    names = [row["system"] for row in rows]
    positions = np.arange(len(names))
    axes.bar(positions - 0.2, [r["read_mibps"] for r in rows], 0.4, label="chunk reads")
    axes.bar(positions + 0.2, [r["write_mibps"] for r in rows], 0.4, label="chunk writes")
    axes.axhline(fio_read, color="C0", linestyle="--", label=f"fio read {fio_read:.0f}")
    axes.axhline(fio_write, color="C1", linestyle="--", label=f"fio write {fio_write:.0f}")
    axes.set_xticks(positions, names, rotation=15, fontsize=8)
    axes.set_ylabel("MiB/s while reading / writing")
    axes.set_title("kvsim: each system against fio on the same file")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
