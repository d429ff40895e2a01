/* The checksum thread of a ring (checksummer.h). A mutex and two condition variables are
 * plenty: a job is a 4 MiB extent, a few hundred per second per ring. */
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ctxkv.h"
#include "checksummer.h"

#define QUEUE_CAPACITY 256 /* the ring's entries: never more extents in flight */

struct job {
    const struct ctxkv_io *io;
    struct ctxkv_io_result *result;
    struct ctxkv_progress *progress;
};

struct ctxkv_checksummer {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t queued;  /* a job was queued, or stopping was set */
    pthread_cond_t drained; /* the queue became empty */
    struct job jobs[QUEUE_CAPACITY];
    uint32_t head; /* next job to take; jobs[head..tail) are queued or being checksummed */
    uint32_t tail;
    int stopping;
};

void ctxkv_extent_checksum(const struct ctxkv_io *io, struct ctxkv_io_result *r,
                           struct ctxkv_progress *progress)
{
    /* A payload_bytes field that claims more than was read (a damaged header) is
     * clamped: the header's own checksum fails then anyway, and the clamp keeps us
     * inside the buffer. */
    const unsigned char *extent = (const unsigned char *)(uintptr_t)io->addr;
    uint32_t payload_bytes;
    memcpy(&payload_bytes, extent + CTXKV_EXTENT_PAYLOAD_BYTES_OFFSET, sizeof(payload_bytes));
    uint32_t room = io->nbytes - CTXKV_EXTENT_HEADER_BYTES;
    if (payload_bytes > room)
        payload_bytes = room;
    r->payload_crc32c = ctxkv_crc32c(0, extent + CTXKV_EXTENT_HEADER_BYTES, payload_bytes);
    if (progress) {
        __atomic_fetch_add(&progress->ops_done, 1, __ATOMIC_RELAXED);
        if (r->result > 0)
            __atomic_fetch_add(&progress->bytes_done, (uint64_t)r->result, __ATOMIC_RELAXED);
    }
    /* Last: the ring's thread takes chunks_pending 0 as "finished, results final". */
    __atomic_store_n(&r->chunks_pending, 0, __ATOMIC_RELEASE);
}

static void *run(void *argument)
{
    struct ctxkv_checksummer *c = argument;
    pthread_mutex_lock(&c->lock);
    for (;;) {
        while (c->head == c->tail && !c->stopping)
            pthread_cond_wait(&c->queued, &c->lock);
        if (c->head == c->tail)
            break; /* stopping, and nothing left */
        struct job job = c->jobs[c->head % QUEUE_CAPACITY];
        pthread_mutex_unlock(&c->lock);
        ctxkv_extent_checksum(job.io, job.result, job.progress);
        pthread_mutex_lock(&c->lock);
        c->head++;
        if (c->head == c->tail)
            pthread_cond_broadcast(&c->drained);
    }
    pthread_mutex_unlock(&c->lock);
    return NULL;
}

int ctxkv_checksummer_start(struct ctxkv_checksummer **out)
{
    struct ctxkv_checksummer *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->queued, NULL);
    pthread_cond_init(&c->drained, NULL);
    int error = pthread_create(&c->thread, NULL, run, c);
    if (error) {
        pthread_cond_destroy(&c->drained);
        pthread_cond_destroy(&c->queued);
        pthread_mutex_destroy(&c->lock);
        free(c);
        return -error;
    }
    *out = c;
    return 0;
}

void ctxkv_checksummer_stop(struct ctxkv_checksummer *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&c->lock);
    c->stopping = 1;
    pthread_cond_signal(&c->queued);
    pthread_mutex_unlock(&c->lock);
    pthread_join(c->thread, NULL);
    pthread_cond_destroy(&c->drained);
    pthread_cond_destroy(&c->queued);
    pthread_mutex_destroy(&c->lock);
    free(c);
}

int ctxkv_checksummer_queue(struct ctxkv_checksummer *c, const struct ctxkv_io *io,
                            struct ctxkv_io_result *r, struct ctxkv_progress *progress)
{
    pthread_mutex_lock(&c->lock);
    if (c->tail - c->head == QUEUE_CAPACITY) {
        pthread_mutex_unlock(&c->lock);
        return -EAGAIN;
    }
    c->jobs[c->tail % QUEUE_CAPACITY] = (struct job){io, r, progress};
    c->tail++;
    pthread_cond_signal(&c->queued);
    pthread_mutex_unlock(&c->lock);
    return 0;
}

void ctxkv_checksummer_drain(struct ctxkv_checksummer *c)
{
    pthread_mutex_lock(&c->lock);
    while (c->head != c->tail)
        pthread_cond_wait(&c->drained, &c->lock);
    pthread_mutex_unlock(&c->lock);
}
