"""What a target holds now: a filesystem, a partition table, RAID or LVM metadata (as
util-linux's libblkid probes them), or a ctxkv store. Format refuses to overwrite any of
them without --force."""

from __future__ import annotations

import shutil
import subprocess

from engine.store.layout import BLOCK_BYTES, Superblock

BLKID_NOTHING_FOUND = 2


def blkid_signatures(path: str) -> list[str]:
    """Descriptions like "ext4 filesystem" or "gpt partition table" found by blkid -p."""
    blkid = shutil.which("blkid") or "/usr/sbin/blkid"
    completed = subprocess.run(
        [blkid, "-p", "-o", "export", path], capture_output=True, text=True, check=False
    )
    if completed.returncode == BLKID_NOTHING_FOUND:
        return []
    if completed.returncode != 0:
        raise OSError(
            f"blkid -p {path} failed ({completed.returncode}): {completed.stderr.strip()}"
        )
    fields = dict(line.split("=", 1) for line in completed.stdout.splitlines() if "=" in line)
    found = []
    if "PTTYPE" in fields:
        found.append(f"{fields['PTTYPE']} partition table")
    if "TYPE" in fields:
        usage = fields.get("USAGE", "signature")
        found.append(f"{fields['TYPE']} {usage}")
    return found


def ctxkv_signature(first_block: bytes) -> str | None:
    """A description of the ctxkv store whose superblock this is, if it is one."""
    assert len(first_block) == BLOCK_BYTES
    if first_block[:8] != Superblock.MAGIC:
        return None
    try:
        superblock = Superblock.unpack(first_block)
    except ValueError:
        return "damaged ctxkv superblock"
    return (
        f"ctxkv store {superblock.store_uuid} (member {superblock.member_index} of "
        f"{superblock.member_count})"
    )
