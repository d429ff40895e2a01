/* The in-memory index: one mapping of 32-byte slots, sized at start-up from max_keys and
 * never resized, so the store's memory is known before the first put.
 *
 * Linear probing, kept in Robin Hood order: along each run of occupied slots the entries'
 * home slots never go backwards (circularly). A lookup of an absent key can then stop at
 * the first entry whose home lies after its own instead of walking to the next empty slot,
 * which at 85% load is ~6x shorter (plain linear probing expects ~23 slots per miss there).
 * Deletion shifts the rest of the run back by one (no tombstones), which keeps the order.
 *
 * The home slot is the digest's lo word mapped to [0, slots) by a multiply-shift
 * ("fastrange"), so the slot count need not be a power of two and memory stays at
 * 32 / 0.85 ~ 37.6 bytes per key instead of up to twice that.
 *
 * One rwlock guards the table: a batch of lookups holds it shared, a batch of changes
 * exclusive. The only write made under the shared lock is the atomic OR into meta. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "index.h"

_Static_assert(sizeof(struct ctxkv_index_entry) == 32,
               "two slots per cache line; mirrored by a numpy dtype and by checkpoint export");
_Static_assert(offsetof(struct ctxkv_index_entry, meta) == 24, "export writes hi, lo, location, meta");

#define INDEX_HUGEPAGE_BYTES (2ull << 20)
/* Far beyond any machine (37 TiB of slots), small enough that no size computation wraps. */
#define INDEX_MAX_KEYS_LIMIT (1ull << 40)
/* Keys ahead of the one being probed whose slots are prefetched: at 10M keys every probe
 * misses the cache, and a batch lets those misses overlap (this VM's memory latency is
 * ~250 ns, so one key at a time cannot pass ~4M lookups/s). */
#define INDEX_PREFETCH_AHEAD 10
/* A key lies 2.8 slots past its home on average at full load, and a miss ends a little
 * further on, so the 4 lines from the home slot are fetched: 8 slots hold nearly every
 * probe. Measured at 10M keys: 1 line ~160 ns a lookup, 2 ~120, 4 ~70, 6 no better. */
#define INDEX_PREFETCH_LINES 4
#define INDEX_CACHE_LINE_BYTES 64

struct ctxkv_index {
    struct ctxkv_index_entry *slots;
    uint64_t slot_count;
    uint64_t max_keys;
    uint64_t map_bytes;
    uint64_t count;      /* written under the exclusive lock, read atomically anywhere */
    uint64_t generation; /* likewise */
    pthread_rwlock_t lock;
};

/* Assertions stay on in release builds (Python builds extensions with -DNDEBUG): a broken
 * index silently serves misses or loses keys, which is worse than stopping. */
__attribute__((noreturn, cold)) static void index_panic(const char *file, int line,
                                                        const char *condition)
{
    fprintf(stderr, "ctxkv index: assertion failed at %s:%d: %s\n", file, line, condition);
    abort();
}

#define INDEX_ASSERT(condition)                                                     \
    do {                                                                            \
        if (__builtin_expect(!(condition), 0))                                      \
            index_panic(__FILE__, __LINE__, #condition);                            \
    } while (0)

static inline uint64_t home_slot(uint64_t slot_count, uint64_t lo)
{
    return (uint64_t)(((unsigned __int128)lo * slot_count) >> 64);
}

static inline uint64_t next_slot(const struct ctxkv_index *index, uint64_t slot)
{
    slot++;
    return slot == index->slot_count ? 0 : slot;
}

static inline uint64_t previous_slot(const struct ctxkv_index *index, uint64_t slot)
{
    return slot == 0 ? index->slot_count - 1 : slot - 1;
}

/* How far slot lies past home, going round the end of the table. */
static inline uint64_t distance(uint64_t slot_count, uint64_t slot, uint64_t home)
{
    return slot >= home ? slot - home : slot + slot_count - home;
}

static inline int slot_empty(const struct ctxkv_index_entry *entry)
{
    return (entry->hi | entry->lo) == 0;
}

static inline uint64_t load_count(const struct ctxkv_index *index)
{
    return __atomic_load_n(&index->count, __ATOMIC_RELAXED);
}

static inline void store_count(struct ctxkv_index *index, uint64_t count)
{
    INDEX_ASSERT(count <= index->max_keys);
    __atomic_store_n(&index->count, count, __ATOMIC_RELAXED);
}

static inline void bump_generation(struct ctxkv_index *index)
{
    __atomic_store_n(&index->generation, index->generation + 1, __ATOMIC_RELEASE);
}

static inline void read_lock(struct ctxkv_index *index)
{
    INDEX_ASSERT(pthread_rwlock_rdlock(&index->lock) == 0);
}

static inline void write_lock(struct ctxkv_index *index)
{
    INDEX_ASSERT(pthread_rwlock_wrlock(&index->lock) == 0);
}

static inline void unlock(struct ctxkv_index *index)
{
    INDEX_ASSERT(pthread_rwlock_unlock(&index->lock) == 0);
}

/* Prefetches the slots from the home of key i + INDEX_PREFETCH_AHEAD on. A macro, not a
 * function: GCC counts __builtin_prefetch as free of side effects, finds a helper holding
 * only that "pure", and deletes every call to it (GCC 12 at -O2 does). */
#define PREFETCH_HOME(index, digests, i, n, rw)                                              \
    do {                                                                                     \
        if ((i) + INDEX_PREFETCH_AHEAD < (n)) {                                              \
            const char *home_ = (const char *)&(index)->slots[home_slot(                     \
                (index)->slot_count, (digests)[2 * ((i) + INDEX_PREFETCH_AHEAD) + 1])];      \
            for (int line_ = 0; line_ < INDEX_PREFETCH_LINES; line_++)                       \
                __builtin_prefetch(home_ + line_ * INDEX_CACHE_LINE_BYTES, (rw));             \
        }                                                                                    \
    } while (0)

struct probe {
    uint64_t slot; /* the key's slot when found, else where it belongs */
    int found;
};

/* Walks the key's run from its home slot. Not found ends at an empty slot or at the first
 * entry whose home lies after the key's (Robin Hood order puts the key before it). */
static struct probe probe(const struct ctxkv_index *index, uint64_t hi, uint64_t lo)
{
    const struct ctxkv_index_entry *slots = index->slots;
    uint64_t slot_count = index->slot_count;
    uint64_t slot = home_slot(slot_count, lo);
    /* Bounded: at most max_keys < slot_count slots are occupied, so an empty one comes. */
    for (uint64_t key_distance = 0; key_distance < slot_count; key_distance++) {
        const struct ctxkv_index_entry *entry = &slots[slot];
        if (slot_empty(entry))
            return (struct probe){.slot = slot, .found = 0};
        if (entry->lo == lo && entry->hi == hi)
            return (struct probe){.slot = slot, .found = 1};
        if (distance(slot_count, slot, home_slot(slot_count, entry->lo)) < key_distance)
            return (struct probe){.slot = slot, .found = 0};
        slot = next_slot(index, slot);
    }
    INDEX_ASSERT(!"probe found no empty slot: the load bound is broken");
    return (struct probe){0};
}

/* Puts entry at slot, moving the rest of the run one slot on to make room. */
static void insert_at(struct ctxkv_index *index, uint64_t slot,
                      const struct ctxkv_index_entry *entry)
{
    struct ctxkv_index_entry *slots = index->slots;
    uint64_t empty = slot;
    for (uint64_t steps = 0; !slot_empty(&slots[empty]); steps++) {
        INDEX_ASSERT(steps < index->slot_count);
        empty = next_slot(index, empty);
    }
    while (empty != slot) {
        uint64_t previous = previous_slot(index, empty);
        slots[empty] = slots[previous];
        empty = previous;
    }
    slots[slot] = *entry;
}

/* Empties slot, moving back by one every following entry of the run that is not in its
 * home slot, so no empty slot ever lies between an entry and its home. */
static void remove_at(struct ctxkv_index *index, uint64_t slot)
{
    struct ctxkv_index_entry *slots = index->slots;
    uint64_t hole = slot;
    for (uint64_t steps = 0;; steps++) {
        INDEX_ASSERT(steps < index->slot_count);
        uint64_t next = next_slot(index, hole);
        const struct ctxkv_index_entry *entry = &slots[next];
        if (slot_empty(entry) || home_slot(index->slot_count, entry->lo) == next)
            break;
        slots[hole] = *entry;
        hole = next;
    }
    memset(&slots[hole], 0, sizeof(slots[hole]));
    /* Pair assertion with probe(): what now follows the hole starts a run of its own. */
    const struct ctxkv_index_entry *after = &slots[next_slot(index, hole)];
    INDEX_ASSERT(slot_empty(after) ||
                 home_slot(index->slot_count, after->lo) == next_slot(index, hole));
}

/* Maps bytes of zeroed memory, 2 MiB-aligned when large enough for transparent huge pages:
 * random probes over hundreds of MiB otherwise miss the TLB on nearly every key. */
static void *map_slots(uint64_t bytes)
{
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
    if (bytes < INDEX_HUGEPAGE_BYTES)
        return mmap(NULL, bytes, PROT_READ | PROT_WRITE, flags, -1, 0);
    uint64_t padded_bytes = bytes + INDEX_HUGEPAGE_BYTES;
    uint8_t *padded = mmap(NULL, padded_bytes, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (padded == MAP_FAILED)
        return MAP_FAILED;
    uint64_t start = ((uint64_t)(uintptr_t)padded + INDEX_HUGEPAGE_BYTES - 1) &
                     ~(INDEX_HUGEPAGE_BYTES - 1);
    uint8_t *aligned = (uint8_t *)(uintptr_t)start;
    uint64_t head_bytes = (uint64_t)(aligned - padded);
    uint64_t tail_bytes = padded_bytes - head_bytes - bytes;
    if (head_bytes != 0)
        INDEX_ASSERT(munmap(padded, head_bytes) == 0);
    if (tail_bytes != 0)
        INDEX_ASSERT(munmap(aligned + bytes, tail_bytes) == 0);
    (void)madvise(aligned, bytes, MADV_HUGEPAGE); /* a hint: refusal is harmless */
    return aligned;
}

int ctxkv_index_new(uint64_t max_keys, struct ctxkv_index **out)
{
    *out = NULL;
    if (max_keys == 0 || max_keys > INDEX_MAX_KEYS_LIMIT)
        return -EINVAL;
    /* ceil(max_keys / 0.85) in integers, so every build sizes a table alike. */
    uint64_t slot_count = (max_keys * 100 + CTXKV_INDEX_MAX_LOAD_PERCENT - 1) /
                          CTXKV_INDEX_MAX_LOAD_PERCENT;
    INDEX_ASSERT(slot_count > max_keys);
    uint64_t page_bytes = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t map_bytes = slot_count * sizeof(struct ctxkv_index_entry);
    map_bytes = (map_bytes + page_bytes - 1) / page_bytes * page_bytes;

    struct ctxkv_index *index = calloc(1, sizeof(*index));
    if (index == NULL)
        return -ENOMEM;
    pthread_rwlockattr_t attributes;
    int error = pthread_rwlockattr_init(&attributes);
    if (error != 0) {
        free(index);
        return -error;
    }
    /* glibc's default lets a steady stream of lookup batches starve every writer. */
    pthread_rwlockattr_setkind_np(&attributes, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    error = pthread_rwlock_init(&index->lock, &attributes);
    pthread_rwlockattr_destroy(&attributes);
    if (error != 0) {
        free(index);
        return -error;
    }
    void *slots = map_slots(map_bytes);
    if (slots == MAP_FAILED) {
        error = errno;
        pthread_rwlock_destroy(&index->lock);
        free(index);
        return -error;
    }
    index->slots = slots;
    index->slot_count = slot_count;
    index->max_keys = max_keys;
    index->map_bytes = map_bytes;
    *out = index;
    return 0;
}

void ctxkv_index_free(struct ctxkv_index *index)
{
    if (index == NULL)
        return;
    INDEX_ASSERT(munmap(index->slots, index->map_bytes) == 0);
    INDEX_ASSERT(pthread_rwlock_destroy(&index->lock) == 0);
    free(index);
}

uint64_t ctxkv_index_count(const struct ctxkv_index *index)
{
    return load_count(index);
}

uint64_t ctxkv_index_max_keys(const struct ctxkv_index *index)
{
    return index->max_keys;
}

uint64_t ctxkv_index_slots(const struct ctxkv_index *index)
{
    return index->slot_count;
}

uint64_t ctxkv_index_memory_bytes(const struct ctxkv_index *index)
{
    return index->map_bytes + sizeof(*index);
}

uint64_t ctxkv_index_generation(const struct ctxkv_index *index)
{
    return __atomic_load_n(&index->generation, __ATOMIC_ACQUIRE);
}

int64_t ctxkv_index_lookup_many(struct ctxkv_index *index, const uint64_t *digests,
                                uint64_t n, uint64_t or_meta, uint64_t *locations,
                                uint64_t *metas, uint8_t *found)
{
    int64_t found_count = 0;
    read_lock(index);
    for (uint64_t i = 0; i < n; i++) {
        PREFETCH_HOME(index, digests, i, n, 0);
        uint64_t hi = digests[2 * i];
        uint64_t lo = digests[2 * i + 1];
        /* The zero digest matches only empty slots, and those end the probe first. */
        struct probe at = probe(index, hi, lo);
        if (!at.found) {
            locations[i] = 0;
            metas[i] = 0;
            if (found != NULL)
                found[i] = 0;
            continue;
        }
        struct ctxkv_index_entry *entry = &index->slots[at.slot];
        uint64_t meta = __atomic_load_n(&entry->meta, __ATOMIC_RELAXED);
        /* Skip the locked OR when the bits are already set: hot keys would otherwise
         * bounce their cache line between every thread that reads them. */
        if ((meta & or_meta) != or_meta)
            meta = __atomic_fetch_or(&entry->meta, or_meta, __ATOMIC_RELAXED);
        locations[i] = entry->location;
        metas[i] = meta;
        if (found != NULL)
            found[i] = 1;
        found_count++;
    }
    unlock(index);
    INDEX_ASSERT((uint64_t)found_count <= n);
    return found_count;
}

static inline uint64_t load_le64(const char *bytes)
{
    uint64_t word;
    memcpy(&word, bytes, sizeof(word));
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    word = __builtin_bswap64(word);
#endif
    return word;
}

int ctxkv_index_get(struct ctxkv_index *index, const char *digest, uint64_t or_meta,
                    uint64_t *out)
{
    uint64_t words[2] = {load_le64(digest + 8), load_le64(digest)}; /* hi, lo */
    uint8_t found = 0;
    ctxkv_index_lookup_many(index, words, 1, or_meta, &out[0], &out[1], &found);
    return found;
}

/* Undoes the first applied upserts of a batch, newest first, so a key upserted twice
 * in the batch ends with the value it had before the batch. */
static void upsert_undo(struct ctxkv_index *index, const uint64_t *digests, uint64_t applied,
                        const uint64_t *old_locations, const uint64_t *old_metas,
                        const uint8_t *replaced)
{
    uint64_t count = index->count;
    for (uint64_t i = applied; i-- > 0;) {
        struct probe at = probe(index, digests[2 * i], digests[2 * i + 1]);
        INDEX_ASSERT(at.found);
        if (replaced[i]) {
            index->slots[at.slot].location = old_locations[i];
            index->slots[at.slot].meta = old_metas[i];
        } else {
            remove_at(index, at.slot);
            count--;
        }
    }
    store_count(index, count);
}

int64_t ctxkv_index_upsert_many(struct ctxkv_index *index, const uint64_t *digests,
                                uint64_t n, const uint64_t *locations, const uint64_t *metas,
                                uint64_t *old_locations, uint64_t *old_metas,
                                uint8_t *replaced)
{
    /* Checked before anything is applied, so a bad batch changes nothing. */
    for (uint64_t i = 0; i < n; i++)
        if ((digests[2 * i] | digests[2 * i + 1]) == 0)
            return -EINVAL;
    /* The undo of a batch that overflows reads replaced[]. */
    INDEX_ASSERT(n == 0 || replaced != NULL);

    write_lock(index);
    uint64_t count_before = index->count;
    uint64_t count = count_before;
    for (uint64_t i = 0; i < n; i++) {
        PREFETCH_HOME(index, digests, i, n, 1);
        uint64_t hi = digests[2 * i];
        uint64_t lo = digests[2 * i + 1];
        struct probe at = probe(index, hi, lo);
        if (at.found) {
            struct ctxkv_index_entry *entry = &index->slots[at.slot];
            old_locations[i] = entry->location;
            old_metas[i] = entry->meta;
            replaced[i] = 1;
            entry->location = locations[i];
            entry->meta = metas[i];
            continue;
        }
        if (count == index->max_keys) {
            /* The load bound is an invariant, not a hint: refuse the whole batch. */
            store_count(index, count);
            upsert_undo(index, digests, i, old_locations, old_metas, replaced);
            INDEX_ASSERT(index->count == count_before);
            unlock(index);
            return -ENOSPC;
        }
        struct ctxkv_index_entry entry = {
            .hi = hi, .lo = lo, .location = locations[i], .meta = metas[i]};
        insert_at(index, at.slot, &entry);
        count++;
        old_locations[i] = 0;
        old_metas[i] = 0;
        replaced[i] = 0;
    }
    store_count(index, count);
    if (n != 0)
        bump_generation(index);
    unlock(index);
    INDEX_ASSERT(count - count_before <= n);
    return (int64_t)(count - count_before);
}

int64_t ctxkv_index_remove_many(struct ctxkv_index *index, const uint64_t *digests,
                                uint64_t n, const uint64_t *expected_locations,
                                uint64_t *old_locations, uint64_t *old_metas, uint8_t *removed)
{
    int64_t removed_count = 0;
    write_lock(index);
    uint64_t count = index->count;
    for (uint64_t i = 0; i < n; i++) {
        PREFETCH_HOME(index, digests, i, n, 1);
        struct probe at = probe(index, digests[2 * i], digests[2 * i + 1]);
        const struct ctxkv_index_entry *entry = &index->slots[at.slot];
        if (!at.found ||
            (expected_locations != NULL && entry->location != expected_locations[i])) {
            old_locations[i] = 0;
            old_metas[i] = 0;
            if (removed != NULL)
                removed[i] = 0;
            continue;
        }
        old_locations[i] = entry->location;
        old_metas[i] = entry->meta;
        if (removed != NULL)
            removed[i] = 1;
        remove_at(index, at.slot);
        INDEX_ASSERT(count > 0);
        count--;
        removed_count++;
    }
    store_count(index, count);
    if (removed_count != 0)
        bump_generation(index);
    unlock(index);
    return removed_count;
}

int64_t ctxkv_index_update_meta_many(struct ctxkv_index *index, const uint64_t *digests,
                                     uint64_t n, uint64_t clear_mask, uint64_t set_mask)
{
    int64_t updated = 0;
    write_lock(index);
    for (uint64_t i = 0; i < n; i++) {
        PREFETCH_HOME(index, digests, i, n, 1);
        struct probe at = probe(index, digests[2 * i], digests[2 * i + 1]);
        if (!at.found)
            continue;
        struct ctxkv_index_entry *entry = &index->slots[at.slot];
        entry->meta = (entry->meta & ~clear_mask) | set_mask;
        updated++;
    }
    if (updated != 0)
        bump_generation(index);
    unlock(index);
    return updated;
}

int64_t ctxkv_index_export(struct ctxkv_index *index, uint64_t cursor, uint64_t *out,
                           uint64_t max, uint64_t *next_cursor)
{
    if (cursor > index->slot_count)
        return -EINVAL;
    int64_t copied = 0;
    uint64_t slot = cursor;
    read_lock(index);
    for (; slot < index->slot_count && (uint64_t)copied < max; slot++) {
        struct ctxkv_index_entry *entry = &index->slots[slot];
        if (slot_empty(entry))
            continue;
        out[4 * copied + 0] = entry->hi;
        out[4 * copied + 1] = entry->lo;
        out[4 * copied + 2] = entry->location;
        out[4 * copied + 3] = __atomic_load_n(&entry->meta, __ATOMIC_RELAXED);
        copied++;
    }
    unlock(index);
    *next_cursor = slot;
    return copied;
}

void ctxkv_index_clear(struct ctxkv_index *index)
{
    write_lock(index);
    /* A private anonymous mapping reads back as zeros after MADV_DONTNEED: the table is
     * empty and its pages are returned at once, without writing 32 bytes per slot. */
    if (madvise(index->slots, index->map_bytes, MADV_DONTNEED) != 0)
        memset(index->slots, 0, index->map_bytes);
    store_count(index, 0);
    bump_generation(index);
    unlock(index);
}

int64_t ctxkv_index_verify(struct ctxkv_index *index, uint64_t *bad_slot)
{
    int64_t result = 0;
    uint64_t live = 0;
    uint64_t slot_count = index->slot_count;
    *bad_slot = slot_count;
    read_lock(index);
    for (uint64_t slot = 0; slot < slot_count; slot++) {
        const struct ctxkv_index_entry *entry = &index->slots[slot];
        if (slot_empty(entry))
            continue;
        live++;
        uint64_t entry_distance = distance(slot_count, slot, home_slot(slot_count, entry->lo));
        if (entry_distance == 0)
            continue;
        /* By induction along the run this also proves every slot back to the home slot
         * occupied: each step back may lower the distance by one at most. */
        uint64_t previous = previous_slot(index, slot);
        const struct ctxkv_index_entry *before = &index->slots[previous];
        if (slot_empty(before) ||
            distance(slot_count, previous, home_slot(slot_count, before->lo)) + 1 <
                entry_distance) {
            *bad_slot = slot;
            result = -EUCLEAN;
            break;
        }
    }
    if (result == 0 && (live != index->count || live > index->max_keys))
        result = -EUCLEAN;
    unlock(index);
    return result < 0 ? result : (int64_t)live;
}
