"""host_memory: when entry points re-execute with glibc's huge-page tunable, that the re-execution keeps the process,
its arguments and environment, and that the tunable removes the per-allocation page faults it is there for."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

import host_memory
from tests.assets import REPO_ROOT

GLIBC = platform.libc_ver()[0] == "glibc" and sys.platform == "linux"


@pytest.mark.parametrize("environ, mode, libc, expected", [
    ({}, "madvise", "glibc", True),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", "glibc", True),  # the user's tunables are kept
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", "glibc", False),   # the user decided
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "madvise", "glibc", False),   # already re-executed
    ({"DOCMIX_HUGE_PAGES": "0"}, "madvise", "glibc", False),
    ({}, "always", "glibc", False),  # every large mapping gets huge pages already
    ({}, "never", "glibc", False),
    ({}, None, "glibc", False),
    ({}, "madvise", "", False),      # musl or another libc: no such tunable
])
def test_when_to_reexec(environ, mode, libc, expected):
    assert host_memory.wants_reexec(environ, mode, libc) is expected


@pytest.mark.skipif(not GLIBC, reason="glibc on Linux only")
def test_reexec_keeps_pid_arguments_and_environment(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import host_memory
        host_memory.thp_mode = lambda: "madvise"  # as on a kernel in madvise mode, whatever this one's is
        print(json.dumps([os.getpid(), sys.argv[1:], os.environ.get("GLIBC_TUNABLES"), os.environ["KEEP"]]),
              flush=True)
        host_memory.use_huge_pages()
        print("done", flush=True)
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DOCMIX_HUGE_PAGES")}
    env.update(GLIBC_TUNABLES="glibc.malloc.arena_max=4", KEEP="x y")
    args = ["a b", "it's", '"q"', "--flag=1;rm -rf /"]
    out = subprocess.run([sys.executable, "-X", "utf8", str(script), *args], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    import json

    first, second = json.loads(out[0]), json.loads(out[1])
    assert out[2:] == ["done"]  # the first run ended at the exec; the second ran on
    assert first[0] == second[0]  # same process
    assert first[1] == second[1] == args
    assert first[2] == "glibc.malloc.arena_max=4"
    assert second[2] == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
    assert second[3] == "x y"


@pytest.mark.skipif(not GLIBC or host_memory.thp_mode() != "madvise",
                    reason="needs glibc and transparent huge pages in madvise mode")
def test_tunable_removes_page_faults_of_large_allocations():
    """The reason for all this: a 512 MiB block allocated, touched and freed three times (as XLA does with a step's
    temporaries) faults in 4 KiB pages each time without the tunable; with it, in huge pages."""
    code = textwrap.dedent("""
        import ctypes, resource
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            block = libc.malloc(512 << 20)
            ctypes.memset(block, 1, 512 << 20)
            libc.free(block)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)  # (numpy would not do: it asks for huge pages for its large arrays itself)

    def faults(tunables: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                  check=True).stdout)

    plain, huge = faults(None), faults(host_memory.TUNABLE)
    assert plain > 3 * (512 << 20) // 4096 * 0.9  # every 4 KiB page, every time
    assert huge < plain / 50
