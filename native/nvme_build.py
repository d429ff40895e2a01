"""cffi builder (API mode) for engine._nvme: ctxkv's binding of Debian's libnvme.

A module of its own, apart from engine._native, so the I/O core does not link libnvme.
setup.py names this file in cffi_modules; `pip install -e .` builds it in place.
"""

from pathlib import Path

from cffi import FFI

NATIVE_DIR = Path(__file__).resolve().parent
# Relative to the repository root, where setup.py runs: setuptools refuses absolute paths.
SOURCES = ["native/nvme.c"]

ffibuilder = FFI()
ffibuilder.cdef((NATIVE_DIR / "nvme.h").read_text())
ffibuilder.set_source(
    "engine._nvme",
    '#include <stddef.h>\n#include <stdint.h>\n#include "nvme.h"\n',
    sources=SOURCES,
    include_dirs=["native"],
    libraries=["nvme"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror"],
)
