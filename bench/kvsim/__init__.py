"""kvsim: a KV-cache workload shaped like inference traffic, replayed on ctxkv and on the
tiers people use today (LMCache's local disk and lm:// server), with fio as the limit.
Run with `python -m bench.kvsim` (or `make bench`)."""
