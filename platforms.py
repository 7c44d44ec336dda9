"""Which JAX backend a docmix command starts on a machine without a TPU.

libtpu (the TPU extra, which `launch.aot` also uses on CPU machines to compile for TPU topologies) makes JAX probe for
TPU chips when it starts its backends, and on a machine without one libtpu prints a page of warnings ("could not
determine TPU accelerator type", "unexpected worker hostname") before falling back to the CPU. When JAX_PLATFORMS is
unset, libtpu is installed and the machine has neither a Google PCI device (every TPU VM has one; jax's own TPU check
reads the same files) nor an NVIDIA GPU, commands use the CPU backend directly. A set JAX_PLATFORMS is never changed.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

GOOGLE_PCI_VENDOR = "0x1ae0"


def _has_accelerator() -> bool:
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return os.path.exists("/proc/driver/nvidia") or bool(glob.glob("/dev/nvidia[0-9]*"))


def skip_tpu_probe() -> None:
    """Sets JAX_PLATFORMS=cpu where libtpu would only probe for a TPU that is not there (see the module docstring);
    call it before JAX starts its backends (the first device query), as `exit_codes.run` does."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None or _has_accelerator():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # jax read the variable at import; its config still applies until backends start
        sys.modules["jax"].config.update("jax_platforms", "cpu")
