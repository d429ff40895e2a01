"""cffi builder (API mode) for engine._index: the in-memory hash index.

A module of its own, apart from engine._native, so the index and the I/O core rebuild
independently. setup.py names this file in cffi_modules; `pip install -e .` builds it in
place.
"""

from pathlib import Path

from cffi import FFI

NATIVE_DIR = Path(__file__).resolve().parent
# Relative to the repository root, where setup.py runs: setuptools refuses absolute paths.
SOURCES = ["native/index.c"]

ffibuilder = FFI()
ffibuilder.cdef((NATIVE_DIR / "index.h").read_text())
ffibuilder.set_source(
    "engine._index",
    '#include <stddef.h>\n#include <stdint.h>\n#include "index.h"\n',
    sources=SOURCES,
    include_dirs=["native"],
    libraries=["pthread"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror"],
)
