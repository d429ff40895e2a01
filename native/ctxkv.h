/*
 * ctxkv native core: the only C in ctxkv. It drives io_uring so that Python never
 * touches an individual SQE: Python builds an array of struct ctxkv_io (with numpy),
 * one call submits, splits, keeps the queue full and reaps, with the GIL released.
 *
 * Every function that can fail returns a negative errno; 0 or a count on success.
 * This header is read by cffi (native/build.py) as well as by the C compiler, so it
 * holds only plain declarations (no macros with expressions, no includes).
 */

/* ---- CRC32C (Castagnoli), bit-exact with the `crc32c` PyPI package ---------------- */

/* crc is the value returned by a previous call (0 to start): crc32c(a+b) == crc32c(b, crc32c(a)). */
uint32_t ctxkv_crc32c(uint32_t crc, const void *data, size_t nbytes);
uint32_t ctxkv_crc32c_portable(uint32_t crc, const void *data, size_t nbytes);
/* memcpy(dst, src, nbytes) and the CRC32C of the bytes, in one pass over them: each
 * piece is checksummed while it is still in cache from the copy. */
uint32_t ctxkv_copy_crc32c(void *dst, const void *src, size_t nbytes);
int ctxkv_crc32c_hardware(void); /* 1 when ctxkv_crc32c uses the SSE4.2 instruction */

/* ---- Buffer arena: one mapping, made once at start-up ------------------------------ */

enum ctxkv_arena_backing {
    CTXKV_ARENA_HUGETLB = 1, /* MAP_HUGETLB 2 MiB pages */
    CTXKV_ARENA_THP = 2,     /* normal pages with MADV_HUGEPAGE */
};

enum ctxkv_arena_step {
    CTXKV_ARENA_STEP_MMAP = 1,
    CTXKV_ARENA_STEP_MLOCK = 2,
};

struct ctxkv_arena {
    uint64_t addr;
    uint64_t nbytes;
    int32_t backing;     /* enum ctxkv_arena_backing */
    int32_t failed_step; /* enum ctxkv_arena_step, when ctxkv_arena_map fails */
};

/* nbytes must be a multiple of 2 MiB. try_hugetlb=0 skips the MAP_HUGETLB attempt. */
int ctxkv_arena_map(uint64_t nbytes, int try_hugetlb, struct ctxkv_arena *arena);
int ctxkv_arena_unmap(struct ctxkv_arena *arena);

/* ---- io_uring ----------------------------------------------------------------------- */

enum ctxkv_opcode {
    CTXKV_OP_READ = 0,
    CTXKV_OP_WRITE = 1,
    CTXKV_OP_FSYNC = 2, /* fdatasync of the file; offset, addr, nbytes ignored */
    CTXKV_OP_MASK = 0x0F,
    /* With READ: the buffer receives an extent (docs/format.md), and once it is in, the
     * CRC32C of its payload (payload_bytes read from the header) goes to
     * result.payload_crc32c, computed while the other I/Os are still in flight. */
    CTXKV_OP_FLAG_EXTENT_CRC = 0x80,
};

/* The two facts of the extent layout that CTXKV_OP_FLAG_EXTENT_CRC relies on; the
 * Python layout module asserts they match. */
enum {
    CTXKV_EXTENT_HEADER_BYTES = 4096,
    CTXKV_EXTENT_PAYLOAD_BYTES_OFFSET = 48,
};

/* buf_index for memory that is not a registered buffer (plain READ/WRITE ops). */
enum { CTXKV_UNREGISTERED_BUFFER = 0xFFFF };

/* One logical I/O. 24 bytes; the numpy dtype in engine/io/ring.py mirrors it. */
struct ctxkv_io {
    uint64_t offset;     /* byte offset in the file */
    uint64_t addr;       /* memory address, inside registered buffer buf_index */
    uint32_t nbytes;
    uint16_t buf_index;  /* registered buffer, or CTXKV_UNREGISTERED_BUFFER */
    uint8_t file_index;  /* registered file */
    uint8_t opcode;      /* enum ctxkv_opcode */
};

/* The outcome of one logical I/O. 32 bytes; filled by ctxkv_ring_run. chunks_pending
 * is 0 once the I/O has finished, its extent checksum included. */
struct ctxkv_io_result {
    int64_t result;        /* bytes moved (may be short), or the first chunk's -errno */
    uint64_t submit_ns;    /* CLOCK_MONOTONIC when its first chunk was queued */
    uint64_t complete_ns;  /* CLOCK_MONOTONIC when its last chunk was reaped */
    uint32_t chunks_pending;
    uint32_t payload_crc32c; /* CTXKV_OP_FLAG_EXTENT_CRC reads only */
};

/* Shared with another thread while a run is going: it reads the counters (for
 * progress) and may set cancel, after which no new I/O is started. */
struct ctxkv_progress {
    uint64_t ops_done;
    uint64_t bytes_done;
    uint32_t cancel;
    uint32_t reserved;
};

enum ctxkv_ring_mode {
    CTXKV_RING_SINGLE_ISSUER = 1, /* the creating thread is the only one to use the ring */
    CTXKV_RING_NVME_PASSTHRU = 2, /* SQE128|CQE32, for ctxkv_ring_set_passthru files */
};

struct ctxkv_ring;

/* Tries SINGLE_ISSUER|DEFER_TASKRUN (when mode allows), then COOP_TASKRUN, then none,
 * falling back on EINVAL as fio does. */
int ctxkv_ring_new(uint32_t entries, uint32_t mode, struct ctxkv_ring **ring);
void ctxkv_ring_free(struct ctxkv_ring *ring);
uint32_t ctxkv_ring_setup_flags(const struct ctxkv_ring *ring);
uint32_t ctxkv_ring_sq_entries(const struct ctxkv_ring *ring);
uint32_t ctxkv_ring_cq_entries(const struct ctxkv_ring *ring);

/* Registers n buffers (addr, nbytes pairs); each may be at most 1 GiB. */
int ctxkv_ring_register_buffers(struct ctxkv_ring *ring, const uint64_t *addrs,
                                const uint64_t *nbytes, uint32_t n);
/* Registers n files; chunk_bytes[i] is where I/O on file i is split (its max transfer). */
int ctxkv_ring_register_files(struct ctxkv_ring *ring, const int32_t *fds,
                              const uint32_t *chunk_bytes, uint32_t n);
/* What I/O on a registered file must keep to: offsets, lengths and addresses multiples
 * of block_bytes, nothing past capacity_bytes, no writes unless writable. */
int ctxkv_ring_set_limits(struct ctxkv_ring *ring, uint32_t file_index, uint32_t block_bytes,
                          uint64_t capacity_bytes, int writable);

/* Why ctxkv_ring_check refuses an I/O. A run completes such an I/O with -EINVAL unsent. */
enum ctxkv_io_problem {
    CTXKV_IO_OK = 0,
    CTXKV_IO_BAD_FILE,           /* file_index names no registered file */
    CTXKV_IO_BAD_OPCODE,         /* an opcode or flag this ring does not know */
    CTXKV_IO_BAD_EXTENT_CRC,     /* EXTENT_CRC on a write, or a read shorter than a header */
    CTXKV_IO_READ_ONLY,          /* a write or fsync on a file that is not writable */
    CTXKV_IO_MISALIGNED_OFFSET,  /* not a multiple of the file's block_bytes */
    CTXKV_IO_MISALIGNED_LENGTH,
    CTXKV_IO_MISALIGNED_ADDRESS,
    CTXKV_IO_EMPTY,              /* a read or write of 0 bytes */
    CTXKV_IO_PAST_END,           /* reaches past the file's capacity_bytes */
    CTXKV_IO_NO_POOL,            /* names a registered buffer, but none are registered */
    CTXKV_IO_OUTSIDE_BUFFER,     /* the bytes do not lie inside buffer buf_index */
};
/* The index of the first of ios[0..n) that would be refused, and why in *problem; n
 * (and CTXKV_IO_OK) when every one is fine. */
uint64_t ctxkv_ring_check(const struct ctxkv_ring *ring, const struct ctxkv_io *ios, uint64_t n,
                          uint32_t *problem);

enum ctxkv_passthru_flags {
    /* Commands on registered buffers say so (IORING_URING_CMD_FIXED, Linux 6.1+), and the
     * kernel skips mapping the pages per command. Without it they go as plain buffers. */
    CTXKV_PASSTHRU_FIXED_BUFFERS = 1,
};

/* Makes registered file file_index an NVMe generic char device (/dev/ngXnY): its reads,
 * writes and fsyncs become NVMe Read, Write and Flush commands (IORING_OP_URING_CMD) on
 * namespace nsid with 2^lba_shift-byte blocks. Its chunk_bytes must be at most the
 * namespace's max transfer: nothing below splits. flags: enum ctxkv_passthru_flags.
 * The ring must have been made with CTXKV_RING_NVME_PASSTHRU. */
int ctxkv_ring_set_passthru(struct ctxkv_ring *ring, uint32_t file_index, uint32_t nsid,
                            uint32_t lba_shift, uint32_t flags);

/* Runs ios[0..n) with at most depth logical I/Os in flight, splitting each at its
 * file's chunk_bytes. Stops starting new I/O once deadline_ns (CLOCK_MONOTONIC; 0 =
 * none) has passed or progress->cancel is set, then waits for what is in flight.
 * Returns the number of ios completed (a prefix of ios), or -errno if the ring itself
 * failed. Per-I/O errors are in results[i].result. progress may be NULL. */
int64_t ctxkv_ring_run(struct ctxkv_ring *ring, const struct ctxkv_io *ios, uint64_t n,
                       uint32_t depth, uint64_t deadline_ns, struct ctxkv_io_result *results,
                       struct ctxkv_progress *progress);

/* A run whose ios are handed over as the caller fills them in, and whose results the
 * caller takes as they finish: a stream of reads keeps depth I/Os in flight while the
 * caller works on values already read, with no pause between batches. ctxkv_ring_run is
 * start, one advance over everything, finish. While a run is open no other run may use
 * the ring. ios and results (capacity entries each) must outlive the run. */
struct ctxkv_run;

int ctxkv_run_start(struct ctxkv_ring *ring, const struct ctxkv_io *ios, uint64_t capacity,
                    uint32_t depth, uint64_t deadline_ns, struct ctxkv_io_result *results,
                    struct ctxkv_progress *progress, struct ctxkv_run **run);
/* ios[0..ready) are filled in (ready never shrinks); queues them as depth allows and
 * returns once ios[0..wanted) have all finished, extent checksums included, or the run
 * has stopped (deadline, cancel). Returns how many leading ios have finished, or -errno
 * if the ring itself failed. wanted <= ready <= capacity. */
int64_t ctxkv_run_advance(struct ctxkv_run *run, uint64_t ready, uint64_t wanted);
/* Queues nothing more, waits for what is in flight and frees the run. Returns the
 * number of ios that ran (a prefix of ios), or -errno if the ring itself failed. */
int64_t ctxkv_run_finish(struct ctxkv_run *run);

uint64_t ctxkv_monotonic_ns(void);
