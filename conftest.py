"""Test-wide environment: fake 8 CPU devices and no hub access, set before jax or transformers is imported."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for every test process and the train.py runs they start: the same small programs
# are compiled by dozens of processes (~8 s of a ~23 s demo run). Keyed by the program, flags and jax version, so a
# hit is the executable a compile would produce. Not capped: JAX's LRU eviction keeps an access-time file beside each
# entry and reads all of them before every write, so one entry left without it (a process the tests kill at that
# moment) fails every later write of every process. The suite's entries take tens of MB.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"docmix-test-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")
