"""glibc malloc settings for XLA:CPU processes (tests/conftest.py, benchmarks/cpu_malloc.py).

By default glibc hands large freed buffers back to the kernel, so every step of an XLA:CPU program
faults its buffers in again, page by page. Two arenas that never shrink, without mmap, keep that
memory for the next step; results are the same bit for bit (benchmarks/cpu_malloc.py checks it).
glibc reads the variable when a process starts.
"""
GLIBC_TUNABLES = "glibc.malloc.arena_max=2:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
