"""The store's in-memory index: key digest -> (location, meta), in native memory.

Keys are never stored here. The store hashes each user key to a 128-bit BLAKE2b digest
(key_digest), keeps the full key in the extent header on disk and checks it on read, so a
digest collision costs a miss, never wrong bytes. BLAKE2b has no per-process seed, so a
key has the same digest in every process and across restarts (unlike Python's hash()).

A digest travels as two uint64 words. Of the 16 digest bytes, lo = bytes[0:8] and
hi = bytes[8:16], each read little-endian; arrays of digests have shape (n, 2) with
columns (hi, lo). The all-zero digest marks an empty slot and cannot be stored.

Every *_many method takes whole numpy arrays and makes one native call with the GIL
released, under one lock acquisition: many threads may use one HashIndex at once.
"""

from __future__ import annotations

import errno
import hashlib
import struct
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from engine._index import ffi, lib
from engine.closing import Closeable
from engine.errors import CtxkvError, native_error
from engine.store.layout import MAX_KEY_BYTES  # the extent header's key field bounds keys
from engine.tenants.keys import TENANT_KEY_MARK, tenant_digest

DIGEST_BYTES = 16
# The table never holds more keys than this fraction of its slots, so probes stay short.
MAX_LOAD = lib.CTXKV_INDEX_MAX_LOAD_PERCENT / 100
MAX_KEYS_LIMIT = 1 << 40  # mirrors INDEX_MAX_KEYS_LIMIT in native/index.c
U64_MAX = (1 << 64) - 1

ENTRY_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("location", "<u8"), ("meta", "<u8")])
assert ENTRY_DTYPE.itemsize == ffi.sizeof("struct ctxkv_index_entry") == 32

_DIGEST_WORDS = struct.Struct("<QQ")  # lo, hi


class IndexFullError(CtxkvError):
    """An upsert batch would take the index past max_keys; nothing of it was applied."""

    def __init__(self, count: int, max_keys: int, batch_keys: int):
        self.count = count
        self.max_keys = max_keys
        self.batch_keys = batch_keys
        super().__init__(
            f"index full: it holds {count} of at most {max_keys} keys, too few free for the "
            f"new keys of a batch of {batch_keys} upserts (nothing was applied; evict, or "
            f"size the index for more keys)"
        )


class IndexChangedError(CtxkvError):
    """The index changed while entries() was walking it, so the walk is no snapshot."""


class IndexCorruptError(CtxkvError):
    """verify() found a broken table invariant."""


def key_digest(key: bytes) -> bytes:
    """BLAKE2b-128 of key: the same in every process (no hash seed). A tenant's key
    (engine.tenants.keys) ends its digest with the tenant's tag instead."""
    if not 0 < len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"a key is 1..{MAX_KEY_BYTES} bytes, got {len(key)}")
    if key[0] == 0 and key.startswith(TENANT_KEY_MARK):  # key[0]: no slice made
        digest = tenant_digest(key)
        if digest is not None:
            return digest
    return hashlib.blake2b(key, digest_size=DIGEST_BYTES).digest()


def key_digests(keys: Sequence[bytes]) -> np.ndarray:
    """Digests of keys as an (n, 2) uint64 array of (hi, lo) words."""
    return digest_array([key_digest(key) for key in keys])


def digest_array(digests: Sequence[bytes]) -> np.ndarray:
    """16-byte digests as an (n, 2) uint64 array of (hi, lo) words."""
    for i, digest in enumerate(digests):
        if len(digest) != DIGEST_BYTES:
            raise ValueError(f"digest {i} is {len(digest)} bytes, not {DIGEST_BYTES}")
    words = np.frombuffer(b"".join(digests), dtype="<u8").reshape(-1, 2)
    return np.ascontiguousarray(words[:, ::-1], dtype=np.uint64)


def digest_words(digest: bytes) -> tuple[int, int]:
    """A 16-byte digest as its (hi, lo) words."""
    if len(digest) != DIGEST_BYTES:
        raise ValueError(f"a digest is {DIGEST_BYTES} bytes, got {len(digest)}")
    lo, hi = _DIGEST_WORDS.unpack(digest)
    return hi, lo


def digest_bytes(hi: int, lo: int) -> bytes:
    """The 16 digest bytes of (hi, lo) words: the inverse of digest_words."""
    return _DIGEST_WORDS.pack(lo, hi)


def _check_u64(name: str, value: int) -> int:
    if not 0 <= value <= U64_MAX:
        raise ValueError(f"{name} must fit in 64 bits unsigned, got {value}")
    return value


def _digest_rows(digests: Any) -> np.ndarray:
    rows = np.ascontiguousarray(digests, dtype=np.uint64)
    if rows.ndim != 2 or rows.shape[1] != 2:
        raise ValueError(f"digests must have shape (n, 2) of (hi, lo) words, got {rows.shape}")
    return rows


def _word_column(name: str, values: Any, n: int) -> np.ndarray:
    if np.ndim(values) == 0:
        return np.full(n, _check_u64(name, int(values)), dtype=np.uint64)
    column = np.ascontiguousarray(values, dtype=np.uint64)
    if column.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the digests, got {column.shape}")
    return column


def _u64_pointer(array: np.ndarray) -> Any:
    return ffi.cast("uint64_t *", ffi.from_buffer(array))


def _u8_pointer(array: np.ndarray) -> Any:
    return ffi.cast("uint8_t *", ffi.from_buffer(array))


class HashIndex(Closeable):
    """Digest -> (location, meta) for at most max_keys keys, in memory sized at start-up.

    location and meta are opaque to the index, except that lookups may OR bits into meta
    and update_meta_many sets and clears them.
    """

    def __init__(self, max_keys: int):
        if not 0 < max_keys <= MAX_KEYS_LIMIT:
            raise ValueError(f"max_keys must be 1..{MAX_KEYS_LIMIT}, got {max_keys}")
        out = ffi.new("struct ctxkv_index **")
        result = lib.ctxkv_index_new(max_keys, out)
        if result < 0:
            raise native_error(result, f"allocating an index for {max_keys} keys")
        memory_bytes = lib.ctxkv_index_memory_bytes(out[0])
        # Freed when the last reference goes, so close() never frees the table under a
        # call that another thread is still making (that call holds a reference).
        self._index: Any = ffi.gc(out[0], lib.ctxkv_index_free, size=memory_bytes)
        self.max_keys = max_keys
        self.slots = lib.ctxkv_index_slots(self._index)
        self.memory_bytes = memory_bytes
        self._scratch = threading.local()
        assert self.slots > max_keys and self.slots * MAX_LOAD <= max_keys + 1

    def _handle(self) -> Any:
        index = self._index
        if index is None:
            raise CtxkvError("the index is closed")
        return index

    @property
    def count(self) -> int:
        return lib.ctxkv_index_count(self._handle())

    def __len__(self) -> int:
        return self.count

    @property
    def bytes_per_key(self) -> float:
        return self.memory_bytes / max(self.count, 1)

    @property
    def generation(self) -> int:
        """Changes whenever a batch changes a key's presence, location or meta."""
        return lib.ctxkv_index_generation(self._handle())

    def lookup_many(
        self, digests: np.ndarray, or_meta: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found, locations, metas) for each digest row; 0 where not found.

        or_meta is OR-ed into the meta of every key found (atomically, so concurrent
        lookups lose no bit); metas are the values from before that OR.
        """
        rows = _digest_rows(digests)
        n = len(rows)
        found = np.zeros(n, dtype=np.bool_)
        locations = np.zeros(n, dtype=np.uint64)
        metas = np.zeros(n, dtype=np.uint64)
        if n == 0:
            return found, locations, metas
        hits = lib.ctxkv_index_lookup_many(
            self._handle(),
            _u64_pointer(rows),
            n,
            _check_u64("or_meta", or_meta),
            _u64_pointer(locations),
            _u64_pointer(metas),
            _u8_pointer(found),
        )
        assert 0 <= hits <= n
        return found, locations, metas

    def get(self, digest: bytes, or_meta: int = 0) -> tuple[int, int] | None:
        """(location, meta) of one key, or None. The single-key path: no numpy, no
        allocation (each thread reuses its own two-word result buffer)."""
        if len(digest) != DIGEST_BYTES:
            raise ValueError(f"a digest is {DIGEST_BYTES} bytes, got {len(digest)}")
        try:
            out = self._scratch.out
        except AttributeError:
            out = self._scratch.out = ffi.new("uint64_t[2]")
        index = self._index  # _handle(), inlined: this is the per-key path
        if index is None:
            raise CtxkvError("the index is closed")
        if lib.ctxkv_index_get(index, bytes(digest), or_meta, out):
            return out[0], out[1]
        return None

    def __contains__(self, digest: object) -> bool:
        return isinstance(digest, bytes | bytearray) and self.get(bytes(digest)) is not None

    def upsert_many(
        self, digests: np.ndarray, locations: Any, metas: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sets each key's (location, meta), in order; returns (replaced, old_locations,
        old_metas), 0 where the key was new. All or nothing: raises IndexFullError when
        the batch would take the index past max_keys, ValueError for a zero digest."""
        rows = _digest_rows(digests)
        n = len(rows)
        new_locations = _word_column("locations", locations, n)
        new_metas = _word_column("metas", metas, n)
        replaced = np.zeros(n, dtype=np.bool_)
        old_locations = np.zeros(n, dtype=np.uint64)
        old_metas = np.zeros(n, dtype=np.uint64)
        if n == 0:
            return replaced, old_locations, old_metas
        inserted = lib.ctxkv_index_upsert_many(
            self._handle(),
            _u64_pointer(rows),
            n,
            _u64_pointer(new_locations),
            _u64_pointer(new_metas),
            _u64_pointer(old_locations),
            _u64_pointer(old_metas),
            _u8_pointer(replaced),
        )
        if inserted < 0:
            self._raise_upsert_error(inserted, rows)
        assert 0 <= inserted <= n
        return replaced, old_locations, old_metas

    def put(self, digest: bytes, location: int, meta: int) -> tuple[int, int] | None:
        """Sets one key; returns its old (location, meta), or None if it was new."""
        words = ffi.new("uint64_t[6]", (*digest_words(digest), location, meta))
        replaced = ffi.new("uint8_t[1]")
        inserted = lib.ctxkv_index_upsert_many(
            self._handle(), words, 1, words + 2, words + 3, words + 4, words + 5, replaced
        )
        if inserted < 0:
            self._raise_upsert_error(inserted, np.array([[words[0], words[1]]], dtype=np.uint64))
        return None if inserted else (words[4], words[5])

    def _raise_upsert_error(self, result: int, rows: np.ndarray) -> None:
        if result == -errno.ENOSPC:
            raise IndexFullError(self.count, self.max_keys, len(rows))
        if result == -errno.EINVAL:
            zero = int(np.flatnonzero((rows[:, 0] | rows[:, 1]) == 0)[0])
            raise ValueError(f"digest {zero} of the batch is all zeros, the empty-slot marker")
        raise native_error(result, "index upsert")

    def remove_many(
        self, digests: np.ndarray, expected_locations: Any = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Removes each key, in order; returns (removed, old_locations, old_metas).

        With expected_locations a key goes only while its location is the one given, so
        an eviction never removes a key that a newer put has moved elsewhere."""
        rows = _digest_rows(digests)
        n = len(rows)
        expected = (
            None
            if expected_locations is None
            else _word_column("expected_locations", expected_locations, n)
        )
        removed = np.zeros(n, dtype=np.bool_)
        old_locations = np.zeros(n, dtype=np.uint64)
        old_metas = np.zeros(n, dtype=np.uint64)
        if n == 0:
            return removed, old_locations, old_metas
        count = lib.ctxkv_index_remove_many(
            self._handle(),
            _u64_pointer(rows),
            n,
            ffi.NULL if expected is None else _u64_pointer(expected),
            _u64_pointer(old_locations),
            _u64_pointer(old_metas),
            _u8_pointer(removed),
        )
        assert 0 <= count <= n
        return removed, old_locations, old_metas

    def remove(self, digest: bytes, expected_location: int | None = None) -> tuple[int, int] | None:
        """Removes one key; returns its (location, meta), or None if nothing was removed."""
        words = ffi.new("uint64_t[5]", (*digest_words(digest), expected_location or 0))
        count = lib.ctxkv_index_remove_many(
            self._handle(),
            words,
            1,
            ffi.NULL if expected_location is None else words + 2,
            words + 3,
            words + 4,
            ffi.NULL,
        )
        return (words[3], words[4]) if count else None

    def update_meta_many(self, digests: np.ndarray, clear_mask: int, set_mask: int) -> int:
        """meta = (meta & ~clear_mask) | set_mask for each key present; returns how many."""
        rows = _digest_rows(digests)
        if len(rows) == 0:
            return 0
        updated = lib.ctxkv_index_update_meta_many(
            self._handle(),
            _u64_pointer(rows),
            len(rows),
            _check_u64("clear_mask", clear_mask),
            _check_u64("set_mask", set_mask),
        )
        assert 0 <= updated <= len(rows)
        return updated

    def entries(self, batch: int = 65536) -> Iterator[np.ndarray]:
        """Every live entry, as arrays of ENTRY_DTYPE (slot order), for checkpoints.

        Each batch is copied under the read lock, and the whole walk must be a snapshot:
        if any batch changes the index between the first copy and the last, this raises
        IndexChangedError (a checkpoint that missed a moved key would lose it). Quiesce
        writers while walking, or pass batch >= max_keys for one copy under one lock."""
        if batch <= 0:
            raise ValueError(f"batch must be positive, got {batch}")
        generation = self.generation
        cursor = 0
        next_cursor = ffi.new("uint64_t *")
        while cursor < self.slots:
            out = np.empty(batch, dtype=ENTRY_DTYPE)
            copied = lib.ctxkv_index_export(
                self._handle(), cursor, _u64_pointer(out), batch, next_cursor
            )
            if copied < 0:
                raise native_error(copied, f"index export from slot {cursor}")
            if self.generation != generation:
                raise IndexChangedError(
                    f"the index changed while its entries were being read (at slot {cursor} "
                    f"of {self.slots}); retry with writers quiesced"
                )
            assert 0 <= copied <= batch and cursor < next_cursor[0] <= self.slots
            cursor = next_cursor[0]
            if copied:
                yield out[:copied]

    def verify(self) -> int:
        """Checks every slot against the table's invariants; returns the key count."""
        bad_slot = ffi.new("uint64_t *")
        result = lib.ctxkv_index_verify(self._handle(), bad_slot)
        if result < 0:
            raise IndexCorruptError(
                f"index invariant broken at slot {bad_slot[0]} of {self.slots} "
                f"(count {self.count}, errno {-result})"
            )
        return result

    def clear(self) -> None:
        lib.ctxkv_index_clear(self._handle())

    def close(self) -> None:
        # Dropping the reference frees the table, at once unless a call is in flight.
        self._index = None

    @property
    def closed(self) -> bool:
        return self._index is None
