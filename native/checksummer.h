/* A thread that checksums extents the ring has read, so the ring's own thread goes
 * straight back to reaping and refilling: checksumming a cold 4 MiB extent takes
 * ~0.4 ms of memory bandwidth, and on the ring's thread it cost reads ~8% of the
 * device's bandwidth (inline) where on its own thread it cost ~2%. Private to native/. */
#ifndef CTXKV_CHECKSUMMER_H
#define CTXKV_CHECKSUMMER_H

/* Include ctxkv.h first: it has no include guard, being cffi's cdef too. */

struct ctxkv_checksummer;

/* Computes r->payload_crc32c from the extent in io's buffer, counts the I/O done in
 * progress (if any), then sets r->chunks_pending to 0: the I/O has finished. */
void ctxkv_extent_checksum(const struct ctxkv_io *io, struct ctxkv_io_result *r,
                           struct ctxkv_progress *progress);

int ctxkv_checksummer_start(struct ctxkv_checksummer **out);
void ctxkv_checksummer_stop(struct ctxkv_checksummer *checksummer);

/* Queues one extent for ctxkv_extent_checksum on the thread; 0, or -EAGAIN when the
 * bounded queue is full (the caller checksums it itself). */
int ctxkv_checksummer_queue(struct ctxkv_checksummer *checksummer, const struct ctxkv_io *io,
                            struct ctxkv_io_result *r, struct ctxkv_progress *progress);

/* Returns once every extent queued so far has been checksummed. */
void ctxkv_checksummer_drain(struct ctxkv_checksummer *checksummer);

#endif
