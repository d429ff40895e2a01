/* The io_uring hot path. One ctxkv_ring_run call does what fio's io_uring engine does
 * for a whole job: it keeps `depth` logical I/Os in flight, splits each into chunks no
 * larger than its file's max transfer, submits in batches with one io_uring_enter per
 * round and reaps every completion that is ready. Python pays one call per batch. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <liburing.h>

#include "ctxkv.h"
#include "checksummer.h"
#include "nvme_cmd.h"

#define CTXKV_MAX_FILES 256

struct ctxkv_ring {
    struct io_uring uring;
    uint32_t setup_flags;
    uint32_t nbuffers;
    uint32_t nfiles;
    uint32_t chunk_bytes[CTXKV_MAX_FILES];
    /* What ctxkv_ring_check holds each I/O to (ctxkv_ring_set_limits). */
    uint32_t block_bytes[CTXKV_MAX_FILES];
    uint64_t capacity_bytes[CTXKV_MAX_FILES];
    uint8_t writable[CTXKV_MAX_FILES];
    uint64_t *buffer_addrs; /* the registered buffers, nbuffers of each */
    uint64_t *buffer_bytes;
    /* NVMe passthrough files (ctxkv_ring_set_passthru): nsid 0 means a plain file. */
    uint32_t passthru_nsid[CTXKV_MAX_FILES];
    uint8_t passthru_lba_shift[CTXKV_MAX_FILES];
    uint8_t passthru_fixed_buffers[CTXKV_MAX_FILES];
    /* Started by the first extent read; NULL until then, or if it could not start. */
    struct ctxkv_checksummer *checksummer;
    int checksummer_failed;
};

/* user_data: the I/O's index in the low bits; for passthrough chunks, the chunk's length
 * in 512-byte sectors above them, because an NVMe completion says "done", not how much. */
#define USER_DATA_INDEX_BITS 40
#define USER_DATA_INDEX_MASK ((UINT64_C(1) << USER_DATA_INDEX_BITS) - 1)

_Static_assert(sizeof(struct ctxkv_io) == 24, "struct ctxkv_io is mirrored by a numpy dtype");
_Static_assert(sizeof(struct ctxkv_io_result) == 32, "mirrored by a numpy dtype");
_Static_assert(sizeof(struct ctxkv_progress) == 24, "read by Python through cffi");

uint64_t ctxkv_monotonic_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

int ctxkv_ring_new(uint32_t entries, uint32_t mode, struct ctxkv_ring **out)
{
    /* Best first. DEFER_TASKRUN runs completions only when we wait for them, on our own
     * thread, which is exactly our usage; it requires SINGLE_ISSUER. */
    static const uint32_t candidates[] = {
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
        IORING_SETUP_COOP_TASKRUN,
        0,
    };
    *out = NULL;
    if (entries == 0)
        return -EINVAL;
    struct ctxkv_ring *ring = calloc(1, sizeof(*ring));
    if (!ring)
        return -ENOMEM;
    /* NVMe passthrough commands are 64 bytes and their completions carry 16 more. */
    uint32_t required = (mode & CTXKV_RING_NVME_PASSTHRU)
                            ? IORING_SETUP_SQE128 | IORING_SETUP_CQE32
                            : 0;
    int result = -EINVAL;
    for (size_t i = 0; i < sizeof(candidates) / sizeof(candidates[0]); i++) {
        uint32_t flags = candidates[i];
        if ((flags & IORING_SETUP_SINGLE_ISSUER) && !(mode & CTXKV_RING_SINGLE_ISSUER))
            continue;
        struct io_uring_params params;
        memset(&params, 0, sizeof(params));
        params.flags = flags | required | IORING_SETUP_CLAMP;
        result = io_uring_queue_init_params(entries, &ring->uring, &params);
        if (result == 0) {
            ring->setup_flags = params.flags;
            *out = ring;
            return 0;
        }
        if (result != -EINVAL)
            break; /* only "flag unknown to this kernel" is worth another try */
    }
    free(ring);
    return result;
}

void ctxkv_ring_free(struct ctxkv_ring *ring)
{
    if (!ring)
        return;
    /* Ring teardown is asynchronous in the kernel and would hold the registered files
     * open a while longer, so an immediate O_EXCL reopen of a device would fail with
     * EBUSY. Unregistering first drops those references before we return. */
    if (ring->nfiles)
        io_uring_unregister_files(&ring->uring);
    if (ring->nbuffers)
        io_uring_unregister_buffers(&ring->uring);
    io_uring_queue_exit(&ring->uring);
    ctxkv_checksummer_stop(ring->checksummer);
    free(ring->buffer_addrs);
    free(ring->buffer_bytes);
    free(ring);
}

uint32_t ctxkv_ring_setup_flags(const struct ctxkv_ring *ring)
{
    return ring->setup_flags;
}

uint32_t ctxkv_ring_sq_entries(const struct ctxkv_ring *ring)
{
    return ring->uring.sq.ring_entries;
}

uint32_t ctxkv_ring_cq_entries(const struct ctxkv_ring *ring)
{
    return ring->uring.cq.ring_entries;
}

int ctxkv_ring_register_buffers(struct ctxkv_ring *ring, const uint64_t *addrs,
                                const uint64_t *nbytes, uint32_t n)
{
    if (ring->nbuffers != 0 || n == 0 || n >= CTXKV_UNREGISTERED_BUFFER)
        return -EINVAL;
    struct iovec *iovecs = calloc(n, sizeof(*iovecs));
    uint64_t *buffer_addrs = malloc(n * sizeof(*buffer_addrs));
    uint64_t *buffer_bytes = malloc(n * sizeof(*buffer_bytes));
    int result = -ENOMEM;
    if (iovecs && buffer_addrs && buffer_bytes) {
        for (uint32_t i = 0; i < n; i++) {
            iovecs[i].iov_base = (void *)(uintptr_t)addrs[i];
            iovecs[i].iov_len = nbytes[i];
        }
        result = io_uring_register_buffers(&ring->uring, iovecs, n);
    }
    free(iovecs);
    if (result != 0) {
        free(buffer_addrs);
        free(buffer_bytes);
        return result;
    }
    memcpy(buffer_addrs, addrs, n * sizeof(*addrs));
    memcpy(buffer_bytes, nbytes, n * sizeof(*nbytes));
    ring->buffer_addrs = buffer_addrs;
    ring->buffer_bytes = buffer_bytes;
    ring->nbuffers = n;
    return 0;
}

int ctxkv_ring_register_files(struct ctxkv_ring *ring, const int32_t *fds,
                              const uint32_t *chunk_bytes, uint32_t n)
{
    if (ring->nfiles != 0 || n == 0 || n > CTXKV_MAX_FILES)
        return -EINVAL;
    for (uint32_t i = 0; i < n; i++)
        if (chunk_bytes[i] == 0)
            return -EINVAL;
    int result = io_uring_register_files(&ring->uring, fds, n);
    if (result != 0)
        return result;
    memcpy(ring->chunk_bytes, chunk_bytes, n * sizeof(chunk_bytes[0]));
    for (uint32_t i = 0; i < n; i++) {
        /* Until ctxkv_ring_set_limits says otherwise: any aligned-to-nothing I/O goes. */
        ring->block_bytes[i] = 1;
        ring->capacity_bytes[i] = UINT64_MAX;
        ring->writable[i] = 1;
    }
    ring->nfiles = n;
    return 0;
}

int ctxkv_ring_set_limits(struct ctxkv_ring *ring, uint32_t file_index, uint32_t block_bytes,
                          uint64_t capacity_bytes, int writable)
{
    if (file_index >= ring->nfiles || block_bytes == 0)
        return -EINVAL;
    ring->block_bytes[file_index] = block_bytes;
    ring->capacity_bytes[file_index] = capacity_bytes;
    ring->writable[file_index] = writable ? 1 : 0;
    return 0;
}

int ctxkv_ring_set_passthru(struct ctxkv_ring *ring, uint32_t file_index, uint32_t nsid,
                            uint32_t lba_shift, uint32_t flags)
{
    uint32_t big = IORING_SETUP_SQE128 | IORING_SETUP_CQE32;
    if ((ring->setup_flags & big) != big || file_index >= ring->nfiles || nsid == 0 ||
        lba_shift < 9 || lba_shift > 16 || ring->chunk_bytes[file_index] % (1u << lba_shift) ||
        (flags & ~(uint32_t)CTXKV_PASSTHRU_FIXED_BUFFERS))
        return -EINVAL;
    ring->passthru_nsid[file_index] = nsid;
    ring->passthru_lba_shift[file_index] = (uint8_t)lba_shift;
    ring->passthru_fixed_buffers[file_index] = !!(flags & CTXKV_PASSTHRU_FIXED_BUFFERS);
    return 0;
}

static uint32_t chunk_count(const struct ctxkv_ring *ring, const struct ctxkv_io *io)
{
    if ((io->opcode & CTXKV_OP_MASK) == CTXKV_OP_FSYNC)
        return 1;
    uint32_t chunk = ring->chunk_bytes[io->file_index];
    return (io->nbytes + chunk - 1) / chunk;
}

static enum ctxkv_io_problem io_problem(const struct ctxkv_ring *ring,
                                        const struct ctxkv_io *io)
{
    uint8_t kind = io->opcode & CTXKV_OP_MASK;
    if (io->file_index >= ring->nfiles)
        return CTXKV_IO_BAD_FILE;
    if (kind > CTXKV_OP_FSYNC || (io->opcode & ~(CTXKV_OP_MASK | CTXKV_OP_FLAG_EXTENT_CRC)))
        return CTXKV_IO_BAD_OPCODE;
    if (io->opcode & CTXKV_OP_FLAG_EXTENT_CRC &&
        (kind != CTXKV_OP_READ || io->nbytes < CTXKV_EXTENT_HEADER_BYTES))
        return CTXKV_IO_BAD_EXTENT_CRC;
    if (kind != CTXKV_OP_READ && !ring->writable[io->file_index])
        return CTXKV_IO_READ_ONLY;
    if (kind == CTXKV_OP_FSYNC)
        return CTXKV_IO_OK;
    uint64_t block = ring->block_bytes[io->file_index];
    if (io->offset % block)
        return CTXKV_IO_MISALIGNED_OFFSET;
    if (io->nbytes % block)
        return CTXKV_IO_MISALIGNED_LENGTH;
    if (io->addr % block)
        return CTXKV_IO_MISALIGNED_ADDRESS;
    if (io->nbytes == 0)
        return CTXKV_IO_EMPTY;
    uint64_t capacity = ring->capacity_bytes[io->file_index];
    if (io->offset > capacity || io->nbytes > capacity - io->offset)
        return CTXKV_IO_PAST_END;
    if (io->buf_index == CTXKV_UNREGISTERED_BUFFER)
        return CTXKV_IO_OK;
    if (ring->nbuffers == 0)
        return CTXKV_IO_NO_POOL;
    if (io->buf_index >= ring->nbuffers || io->addr < ring->buffer_addrs[io->buf_index] ||
        io->addr - ring->buffer_addrs[io->buf_index] + io->nbytes >
            ring->buffer_bytes[io->buf_index])
        return CTXKV_IO_OUTSIDE_BUFFER;
    return CTXKV_IO_OK;
}

uint64_t ctxkv_ring_check(const struct ctxkv_ring *ring, const struct ctxkv_io *ios, uint64_t n,
                          uint32_t *problem)
{
    *problem = CTXKV_IO_OK;
    for (uint64_t i = 0; i < n; i++) {
        enum ctxkv_io_problem found = io_problem(ring, &ios[i]);
        if (found != CTXKV_IO_OK) {
            *problem = found;
            return i;
        }
    }
    return n;
}

static void prep_passthru_chunk(const struct ctxkv_ring *ring, struct io_uring_sqe *sqe,
                                const struct ctxkv_io *io, uint64_t index,
                                uint32_t chunk_offset, uint32_t chunk_len)
{
    static const uint8_t nvme_opcode[] = {
        [CTXKV_OP_READ] = CTXKV_NVME_READ,
        [CTXKV_OP_WRITE] = CTXKV_NVME_WRITE,
        [CTXKV_OP_FSYNC] = CTXKV_NVME_FLUSH,
    };
    uint8_t file = io->file_index;
    ctxkv_prep_nvme_cmd(sqe, nvme_opcode[io->opcode & CTXKV_OP_MASK], file,
                        ring->passthru_nsid[file], ring->passthru_lba_shift[file],
                        io->offset + chunk_offset, io->addr + chunk_offset, chunk_len,
                        ring->passthru_fixed_buffers[file] ? io->buf_index
                                                           : CTXKV_UNREGISTERED_BUFFER);
    io_uring_sqe_set_data64(sqe, index | (uint64_t)(chunk_len >> 9) << USER_DATA_INDEX_BITS);
}

/* user_data is the I/O's index, so a completion needs no lookup table. */
static void prep_chunk(const struct ctxkv_ring *ring, struct io_uring_sqe *sqe,
                       const struct ctxkv_io *io, uint64_t index, uint32_t chunk_offset,
                       uint32_t chunk_len)
{
    if (ring->passthru_nsid[io->file_index]) {
        prep_passthru_chunk(ring, sqe, io, index, chunk_offset, chunk_len);
        return;
    }
    void *addr = (void *)(uintptr_t)(io->addr + chunk_offset);
    uint64_t offset = io->offset + chunk_offset;
    int registered = io->buf_index != CTXKV_UNREGISTERED_BUFFER;
    switch (io->opcode & CTXKV_OP_MASK) {
    case CTXKV_OP_READ:
        if (registered)
            io_uring_prep_read_fixed(sqe, io->file_index, addr, chunk_len, offset, io->buf_index);
        else
            io_uring_prep_read(sqe, io->file_index, addr, chunk_len, offset);
        break;
    case CTXKV_OP_WRITE:
        if (registered)
            io_uring_prep_write_fixed(sqe, io->file_index, addr, chunk_len, offset,
                                      io->buf_index);
        else
            io_uring_prep_write(sqe, io->file_index, addr, chunk_len, offset);
        break;
    default:
        io_uring_prep_fsync(sqe, io->file_index, IORING_FSYNC_DATASYNC);
        break;
    }
    sqe->flags |= IOSQE_FIXED_FILE;
    io_uring_sqe_set_data64(sqe, index);
}

#define WAIT_SLICE_NS (100 * 1000 * 1000)

struct ctxkv_run {
    struct ctxkv_ring *ring;
    const struct ctxkv_io *ios;
    struct ctxkv_io_result *results;
    struct ctxkv_progress *progress;
    uint64_t capacity;
    uint64_t ready;            /* ios[0..ready) are filled in and may be queued */
    uint64_t deadline_ns;
    uint32_t depth;
    uint64_t next;             /* first I/O not yet fully queued */
    uint32_t next_offset;      /* bytes of ios[next] already queued */
    uint64_t completed;        /* I/Os whose bytes are in (a checksum may still run) */
    uint64_t finished;         /* ios[0..finished) have finished, checksums included */
    uint32_t ops_in_flight;    /* logical I/Os started whose bytes are not all in */
    uint32_t chunks_in_flight; /* never above the CQ size, so no overflow */
    int checksums_queued;      /* the checksummer must be drained before returning */
    int stopping;
    int64_t failure;           /* the ring's -errno once it broke; the run is over then */
};

static void run_init(struct ctxkv_run *run, struct ctxkv_ring *ring,
                     const struct ctxkv_io *ios, uint64_t capacity, uint32_t depth,
                     uint64_t deadline_ns, struct ctxkv_io_result *results,
                     struct ctxkv_progress *progress)
{
    memset(run, 0, sizeof(*run));
    run->ring = ring;
    run->ios = ios;
    run->results = results;
    run->progress = progress;
    run->capacity = capacity;
    run->deadline_ns = deadline_ns;
    run->depth = depth;
}

static void finish(struct ctxkv_io_result *r, struct ctxkv_run *run)
{
    run->completed++;
    __atomic_store_n(&r->chunks_pending, 0, __ATOMIC_RELEASE);
    if (run->progress) {
        __atomic_fetch_add(&run->progress->ops_done, 1, __ATOMIC_RELAXED);
        if (r->result > 0)
            __atomic_fetch_add(&run->progress->bytes_done, (uint64_t)r->result,
                               __ATOMIC_RELAXED);
    }
}

/* An extent read counts one more pending step than it has chunks: its checksum. */
static uint32_t checksum_steps(const struct ctxkv_io *io)
{
    return (io->opcode & CTXKV_OP_FLAG_EXTENT_CRC) ? 1 : 0;
}

/* Queues SQEs until depth I/Os are in flight, the CQ could overflow or the SQ is full. */
static void queue_ios(struct ctxkv_run *run)
{
    struct ctxkv_ring *ring = run->ring;
    const uint32_t cq_capacity = ring->uring.cq.ring_entries;
    while (run->next < run->ready && !run->stopping) {
        const struct ctxkv_io *io = &run->ios[run->next];
        struct ctxkv_io_result *r = &run->results[run->next];
        if (run->next_offset == 0) {
            if (run->ops_in_flight >= run->depth)
                break;
            if ((run->progress && __atomic_load_n(&run->progress->cancel, __ATOMIC_RELAXED)) ||
                (run->deadline_ns && ctxkv_monotonic_ns() >= run->deadline_ns)) {
                run->stopping = 1;
                break;
            }
            r->submit_ns = ctxkv_monotonic_ns();
            r->complete_ns = r->submit_ns;
            r->payload_crc32c = 0;
            if (io_problem(ring, io) != CTXKV_IO_OK) {
                /* ios complete in order only as a prefix; an invalid one in the
                 * middle completes at once rather than stalling the prefix. */
                r->result = -EINVAL;
                run->next++;
                finish(r, run);
                continue;
            }
            r->result = 0;
            r->chunks_pending = chunk_count(ring, io) + checksum_steps(io);
            run->ops_in_flight++;
        }
        if (run->chunks_in_flight >= cq_capacity)
            break;
        struct io_uring_sqe *sqe = io_uring_get_sqe(&ring->uring);
        if (!sqe)
            break; /* SQ full: submit what we have, come back after reaping */
        int fsync = (io->opcode & CTXKV_OP_MASK) == CTXKV_OP_FSYNC;
        uint32_t remaining = fsync ? 0 : io->nbytes - run->next_offset;
        uint32_t chunk = ring->chunk_bytes[io->file_index];
        uint32_t chunk_len = remaining < chunk ? remaining : chunk;
        prep_chunk(ring, sqe, io, run->next, run->next_offset, chunk_len);
        run->chunks_in_flight++;
        run->next_offset += chunk_len;
        if (run->next_offset >= io->nbytes || fsync) {
            run->next++;
            run->next_offset = 0;
        }
    }
}

/* Hands an extent read whose bytes are all in to the ring's checksum thread, or, when
 * there is none or its queue is full, checksums it here. */
static void checksum(struct ctxkv_run *run, const struct ctxkv_io *io, struct ctxkv_io_result *r)
{
    struct ctxkv_ring *ring = run->ring;
    run->completed++;
    if (!ring->checksummer && !ring->checksummer_failed)
        ring->checksummer_failed = ctxkv_checksummer_start(&ring->checksummer) != 0;
    if (ring->checksummer &&
        ctxkv_checksummer_queue(ring->checksummer, io, r, run->progress) == 0)
        run->checksums_queued = 1;
    else
        ctxkv_extent_checksum(io, r, run->progress);
}

/* Takes every completion posted. */
static void reap(struct ctxkv_run *run)
{
    struct ctxkv_ring *ring = run->ring;
    struct io_uring_cqe *cqe;
    unsigned head;
    unsigned reaped = 0;
    io_uring_for_each_cqe(&ring->uring, head, cqe)
    {
        uint64_t index = cqe->user_data & USER_DATA_INDEX_MASK;
        struct ctxkv_io_result *r = &run->results[index];
        const struct ctxkv_io *io = &run->ios[index];
        int64_t res = cqe->res;
        if (ring->passthru_nsid[io->file_index])
            res = ctxkv_nvme_cmd_result(
                cqe->res, (uint32_t)(cqe->user_data >> USER_DATA_INDEX_BITS) << 9);
        if (res < 0) {
            if (r->result >= 0)
                r->result = res; /* the first error is the one to report */
        } else if (r->result >= 0) {
            r->result += res; /* a short chunk leaves result below nbytes */
        }
        reaped++;
        run->chunks_in_flight--;
        uint32_t steps = checksum_steps(io);
        if (--r->chunks_pending == steps) {
            r->complete_ns = ctxkv_monotonic_ns();
            run->ops_in_flight--;
            if (steps && r->result == io->nbytes)
                checksum(run, io, r);
            else
                finish(r, run);
        }
    }
    io_uring_cq_advance(&ring->uring, reaped);
}

/* Submits what is queued and waits for at least one completion, then reaps. */
static int wait_and_reap(struct ctxkv_run *run)
{
    /* Waits in slices rather than forever: a completion the kernel leaves as pending
     * task work on a ring without DEFER_TASKRUN is only posted once this task enters
     * the kernel again; a test run here once sat in io_cqring_wait for good with two
     * reads consumed and no completion posted. Each slice that ends re-enters. */
    struct __kernel_timespec wait_slice = {.tv_sec = 0, .tv_nsec = WAIT_SLICE_NS};
    struct io_uring_cqe *first_cqe;
    int submitted;
    do {
        submitted = io_uring_submit_and_wait_timeout(&run->ring->uring, &first_cqe, 1,
                                                     &wait_slice, NULL);
    } while (submitted == -EINTR);
    if (submitted < 0 && submitted != -EAGAIN && submitted != -EBUSY && submitted != -ETIME) {
        run->failure = submitted; /* the ring itself is broken; results say nothing */
        return submitted;
    }
    reap(run);
    return 0;
}

/* The checksum thread writes into results: drained before the caller reads them. */
static void drain_checksums(struct ctxkv_run *run)
{
    if (run->checksums_queued) {
        ctxkv_checksummer_drain(run->ring->checksummer);
        run->checksums_queued = 0;
    }
}

static void count_finished(struct ctxkv_run *run)
{
    while (run->finished < run->next &&
           __atomic_load_n(&run->results[run->finished].chunks_pending, __ATOMIC_ACQUIRE) == 0)
        run->finished++;
}

static int64_t run_advance(struct ctxkv_run *run, uint64_t ready, uint64_t wanted)
{
    if (ready < run->ready || ready > run->capacity || wanted > ready)
        return -EINVAL;
    if (run->failure)
        return run->failure;
    run->ready = ready;
    for (;;) {
        queue_ios(run);
        count_finished(run);
        if (run->finished >= wanted) {
            /* Back to the caller with the device still busy: what was queued goes now. */
            if (io_uring_sq_ready(&run->ring->uring))
                io_uring_submit(&run->ring->uring);
            return (int64_t)run->finished;
        }
        if (run->chunks_in_flight == 0) {
            /* Nothing on the device: what is missing is a checksum, or the run stopped. */
            drain_checksums(run);
            count_finished(run);
            return (int64_t)run->finished;
        }
        int error = wait_and_reap(run);
        if (error)
            return error;
    }
}

static int64_t run_finish(struct ctxkv_run *run)
{
    run->stopping = 1;
    while (run->chunks_in_flight && !run->failure)
        wait_and_reap(run);
    drain_checksums(run);
    return run->failure ? run->failure : (int64_t)run->completed;
}

int ctxkv_run_start(struct ctxkv_ring *ring, const struct ctxkv_io *ios, uint64_t capacity,
                    uint32_t depth, uint64_t deadline_ns, struct ctxkv_io_result *results,
                    struct ctxkv_progress *progress, struct ctxkv_run **out)
{
    *out = NULL;
    if (depth == 0 || capacity > USER_DATA_INDEX_MASK)
        return -EINVAL;
    struct ctxkv_run *run = malloc(sizeof(*run));
    if (!run)
        return -ENOMEM;
    run_init(run, ring, ios, capacity, depth, deadline_ns, results, progress);
    *out = run;
    return 0;
}

int64_t ctxkv_run_advance(struct ctxkv_run *run, uint64_t ready, uint64_t wanted)
{
    return run_advance(run, ready, wanted);
}

int64_t ctxkv_run_finish(struct ctxkv_run *run)
{
    int64_t outcome = run_finish(run);
    free(run);
    return outcome;
}

int64_t ctxkv_ring_run(struct ctxkv_ring *ring, const struct ctxkv_io *ios, uint64_t n,
                       uint32_t depth, uint64_t deadline_ns, struct ctxkv_io_result *results,
                       struct ctxkv_progress *progress)
{
    if (depth == 0 || n > USER_DATA_INDEX_MASK)
        return -EINVAL;
    struct ctxkv_run run;
    run_init(&run, ring, ios, n, depth, deadline_ns, results, progress);
    int64_t advanced = run_advance(&run, n, n);
    int64_t outcome = run_finish(&run);
    return advanced < 0 ? advanced : outcome;
}
