"""cffi builder (API mode) for engine._native: the C hot path, linked to Debian's liburing.

setup.py names this file in cffi_modules; `pip install -e .` builds it in place.
"""

from pathlib import Path

from cffi import FFI

NATIVE_DIR = Path(__file__).resolve().parent
# Relative to the repository root, where setup.py runs: setuptools refuses absolute paths.
SOURCES = [
    "native/ring.c", "native/checksummer.c", "native/arena.c", "native/crc32c.c",
    "native/nvme_cmd.c",
]  # fmt: skip

ffibuilder = FFI()
ffibuilder.cdef((NATIVE_DIR / "ctxkv.h").read_text())
ffibuilder.set_source(
    "engine._native",
    '#include <stddef.h>\n#include <stdint.h>\n#include "ctxkv.h"\n',
    sources=SOURCES,
    include_dirs=["native"],
    libraries=["uring"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror"],
)
