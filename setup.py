from pathlib import Path

from setuptools import find_packages, setup

# NIXL's data path (`ctxkv serve --nixl`, engine/client/nixl.py); the Makefile installs
# the same file. NIXL pulls torch: install torch's CPU build first where there is no GPU.
NIXL_REQUIREMENTS = [
    line
    for line in (Path(__file__).parent / "requirements" / "nixl.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="ctxkv",
    version="0.1.0",
    description="A KV-cache storage engine for LLM inference over raw NVMe namespaces",
    python_requires=">=3.11",
    packages=find_packages(include=["engine", "engine.*"]),
    setup_requires=["cffi>=1.16"],
    cffi_modules=[
        "native/build.py:ffibuilder",
        "native/index_build.py:ffibuilder",
        "native/nvme_build.py:ffibuilder",
    ],
    install_requires=["cffi>=1.16", "numpy>=1.26"],
    extras_require={
        "test": [
            "pytest>=8",
            "crc32c>=2.4",
            "hypothesis>=6",
            "ruff>=0.6",
            "prometheus_client>=0.17",
        ],
        "nixl": NIXL_REQUIREMENTS,
    },
    entry_points={"console_scripts": ["ctxkv = engine.cli.main:main"]},
)
