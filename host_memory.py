"""Transparent huge pages for large host allocations: entry points re-execute themselves once with glibc's tunable.

On a CPU, XLA allocates each execution's temporaries as one block with malloc (gigabytes for a SmolLM2-135M train
step). glibc serves a block that large with a fresh anonymous mapping and unmaps it on free, so every step faults its
whole working set in again, 4 KiB at a time, and spends much of the step in the kernel. With `glibc.malloc.hugetlb=1`,
malloc marks such mappings for transparent huge pages (madvise), and the faults and kernel time almost vanish
(BENCHMARKS.md has the measurements). The kernel must allow it (`/sys/kernel/mm/transparent_hugepage/enabled` in
"madvise"; in "always" every large mapping gets huge pages already). glibc reads tunables only when a process starts,
hence the re-execution: same process id, arguments and environment, plus the tunable. `DOCMIX_HUGE_PAGES=0` turns it
off.
"""
from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None where there is none."""
    try:
        with open(THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1: text.index("]")] if "[" in text else None


def wants_reexec(environ: dict[str, str], mode: str | None, libc: str) -> bool:
    """True when re-executing with TUNABLE would change how large allocations are mapped: glibc, the kernel in
    "madvise" mode, the tunable not yet set (by us or the user) and not turned off with DOCMIX_HUGE_PAGES=0."""
    return (libc == "glibc" and mode == "madvise" and environ.get("DOCMIX_HUGE_PAGES", "1") != "0"
            and "glibc.malloc.hugetlb" not in environ.get("GLIBC_TUNABLES", ""))


def use_huge_pages() -> None:
    """Call first in an entry point's `__main__` block: re-executes the process with TUNABLE where `wants_reexec`,
    else returns. Nothing runs twice: this is the first thing the process does."""
    if sys.platform != "linux" or not wants_reexec(dict(os.environ), thp_mode(), platform.libc_ver()[0]):
        return
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
    env = dict(os.environ, GLIBC_TUNABLES=":".join([*tunables, TUNABLE]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
