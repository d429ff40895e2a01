"""The in-memory index: key digest -> (location, meta), a native hash table."""

from engine.index.table import (
    DIGEST_BYTES,
    ENTRY_DTYPE,
    MAX_KEY_BYTES,
    MAX_LOAD,
    HashIndex,
    IndexChangedError,
    IndexCorruptError,
    IndexFullError,
    digest_array,
    digest_bytes,
    digest_words,
    key_digest,
    key_digests,
)

__all__ = [
    "DIGEST_BYTES",
    "ENTRY_DTYPE",
    "MAX_KEY_BYTES",
    "MAX_LOAD",
    "HashIndex",
    "IndexChangedError",
    "IndexCorruptError",
    "IndexFullError",
    "digest_array",
    "digest_bytes",
    "digest_words",
    "key_digest",
    "key_digests",
]
