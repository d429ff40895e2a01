"""How a tenant's keys are namespaced, and how a value's owner is known from its digest.

A tenant's key is stored as TENANT_KEY_MARK + name + b"\\0" + the client's key, so two
tenants' equal keys are two values. Its 128-bit digest is BLAKE2b-96 of that full key
followed by the tenant's 32-bit tag (BLAKE2b-32 of the name): the owner of every slot is
then known from the digest the allocator, the journal and the checkpoint already keep,
with no byte of extra memory per key and no change to the on-disk format. The tag sits
in the digest's last bytes (the index's hi word), because the index places keys by the
lo word, which stays uniformly random.

A key without the mark keeps its plain BLAKE2b-128 digest, exactly as before tenants.
"""

from __future__ import annotations

import hashlib
import re

TENANT_KEY_MARK = b"\x00t:"
TAG_BYTES = 4
TAG_OFFSET = 12  # digest bytes 12..15: the top of the index's hi word
DIGEST_BYTES = 16
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,32}")


def tenant_tag(name: str) -> int:
    """The 32-bit tag a tenant's digests end with."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=TAG_BYTES).digest(), "little")


def tenant_prefix(name: str) -> bytes:
    """What every stored key of tenant name starts with."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"tenant name {name!r}: 1 to 32 characters of letters, digits, '_', '.', '-'"
        )
    return TENANT_KEY_MARK + name.encode() + b"\0"


def tenant_digest(full_key: bytes) -> bytes | None:
    """The digest of a tenant's stored key (prefix + key), or None when full_key is no
    tenant's (no mark, or a malformed prefix): it then has the plain digest."""
    end = full_key.find(b"\0", len(TENANT_KEY_MARK))
    if end < 0:
        return None
    name = full_key[len(TENANT_KEY_MARK) : end].decode("ascii", "replace")
    if not NAME_PATTERN.fullmatch(name):
        return None
    body = hashlib.blake2b(full_key, digest_size=DIGEST_BYTES - TAG_BYTES).digest()
    return body + tenant_tag(name).to_bytes(TAG_BYTES, "little")


def digest_tag(digest: bytes) -> int:
    """The tag part of a digest (meaningful only for a tenant's digest)."""
    return int.from_bytes(digest[TAG_OFFSET:], "little")
