/*
 * ctxkv in-memory index: an open-addressing hash table from a 128-bit key digest to two
 * opaque words (location, meta). The store hashes user keys (BLAKE2b-128) and keeps the
 * full key on disk, checked on read, so the table never sees keys and a digest collision
 * costs a miss, never wrong bytes.
 *
 * Every call takes a batch: Python pays one crossing and the table one lock acquisition
 * per batch, not per key. Every function that can fail returns a negative errno.
 * This header is read by cffi (native/index_build.py) as well as by the C compiler, so it
 * holds only plain declarations (no macros with expressions, no includes).
 * Output arrays must not be NULL except where a comment says they may be.
 */

/* The table never holds more than max_keys keys, and has ceil(max_keys * 100 / 85) slots,
 * so at least 15% of the slots are always empty and every probe ends. */
enum { CTXKV_INDEX_MAX_LOAD_PERCENT = 85 };

/* One slot. 32 bytes, two per cache line; the numpy dtype in engine/index/table.py
 * mirrors it. hi == lo == 0 marks an empty slot, which is why the zero digest is refused. */
struct ctxkv_index_entry {
    uint64_t hi;
    uint64_t lo; /* picks the home slot: the digest is uniformly random, so lo is too */
    uint64_t location;
    uint64_t meta;
};

struct ctxkv_index;

/* max_keys from 1 to 2^40; -EINVAL outside, -ENOMEM when the slots cannot be mapped. */
int ctxkv_index_new(uint64_t max_keys, struct ctxkv_index **out);
void ctxkv_index_free(struct ctxkv_index *index);
uint64_t ctxkv_index_count(const struct ctxkv_index *index);
uint64_t ctxkv_index_max_keys(const struct ctxkv_index *index);
uint64_t ctxkv_index_slots(const struct ctxkv_index *index);
/* Bytes mapped for the slots (whole pages) plus the struct. */
uint64_t ctxkv_index_memory_bytes(const struct ctxkv_index *index);
/* Bumped by every batch that changed a key's presence, location or meta (the meta OR of a
 * lookup excepted), so an exporter can tell that the table moved under it. */
uint64_t ctxkv_index_generation(const struct ctxkv_index *index);

/* digests holds 2n words: hi, lo of each key. found may be NULL; locations[i] and metas[i]
 * are 0 for a key not found. When or_meta != 0 it is atomically OR-ed into the meta of
 * every key found (the store's "referenced" bit for CLOCK eviction); metas[i] is the meta
 * as it was before that OR. Returns the number found. */
int64_t ctxkv_index_lookup_many(struct ctxkv_index *index, const uint64_t *digests,
                                uint64_t n, uint64_t or_meta, uint64_t *locations,
                                uint64_t *metas, uint8_t *found);

/* One lookup, for callers holding one key rather than a batch (each batch call from
 * Python pays for building its arrays). digest is the 16 digest bytes: lo is bytes 0..7
 * and hi bytes 8..15, little-endian. Sets out[0] = location, out[1] = meta (before the
 * OR of or_meta) and returns 1 when found; returns 0 when not. */
int ctxkv_index_get(struct ctxkv_index *index, const char *digest, uint64_t or_meta,
                    uint64_t *out);

/* n upserts, applied in order (a key twice in a batch ends with its last value).
 * When key i existed replaced[i] = 1 and old_locations[i], old_metas[i] hold what it had,
 * else all three are 0 (replaced may not be NULL here: undoing a batch reads it). Returns the number of keys inserted
 * new; -EINVAL when a digest is zero and -ENOSPC when the batch would take the table past
 * max_keys, and then no entry of the batch is applied and the outputs are undefined. */
int64_t ctxkv_index_upsert_many(struct ctxkv_index *index, const uint64_t *digests,
                                uint64_t n, const uint64_t *locations, const uint64_t *metas,
                                uint64_t *old_locations, uint64_t *old_metas,
                                uint8_t *replaced);

/* n removals, in order. When expected_locations is not NULL a key is removed only when its
 * location equals expected_locations[i] (eviction must not remove a key that a newer put
 * moved). removed may be NULL; when key i is removed removed[i] = 1 and old_locations[i],
 * old_metas[i] hold its values, else all three are 0. Returns the number removed. */
int64_t ctxkv_index_remove_many(struct ctxkv_index *index, const uint64_t *digests,
                                uint64_t n, const uint64_t *expected_locations,
                                uint64_t *old_locations, uint64_t *old_metas, uint8_t *removed);

/* meta = (meta & ~clear_mask) | set_mask for each of the n keys present (pin, unpin,
 * clearing the referenced bit). Returns the number updated. */
int64_t ctxkv_index_update_meta_many(struct ctxkv_index *index, const uint64_t *digests,
                                     uint64_t n, uint64_t clear_mask, uint64_t set_mask);

/* Copies up to max live entries, scanning from slot cursor, into out (4 words each: hi, lo,
 * location, meta). Sets *next_cursor to the slot to resume from (== slots when done) and
 * returns the number copied. One read lock per call: a sequence of calls is a consistent
 * snapshot only if generation did not change across it. */
int64_t ctxkv_index_export(struct ctxkv_index *index, uint64_t cursor, uint64_t *out,
                           uint64_t max, uint64_t *next_cursor);

/* Removes every key and gives the slots' pages back to the kernel. */
void ctxkv_index_clear(struct ctxkv_index *index);

/* Walks the whole table checking its invariants: no live entry before its home slot, no
 * empty slot between an entry and its home, homes in circular order along each run, the
 * count right. Returns the count, or -EUCLEAN; *bad_slot names the first slot at fault.
 * O(slots), for tests and scrub. */
int64_t ctxkv_index_verify(struct ctxkv_index *index, uint64_t *bad_slot);
