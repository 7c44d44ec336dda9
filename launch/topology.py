"""TPU slices as the compiler and the cloud name them: compile-only devices of a topology (`v6e:2x4`), the HBM the
compiler gives a program per chip, and the topology of a Cloud TPU accelerator type (`v6e-8` -> `v6e:2x4`)."""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from typing import Any

import exit_codes

GIB = 2 ** 30
# HBM per chip that the TPU compiler lets one program use (the `Y` of its out-of-memory message "Used X of Y hbm"),
# in GiB: the chip's HBM less what the TPU runtime keeps for itself (v6e and v4: 32 GiB less 0.75; v5e: 16 less 0.25).
HBM_GIB = {"TPU v4": 31.25, "TPU v5 lite": 15.75, "TPU v5": 95.74, "TPU v6 lite": 31.25}

# Cloud TPU accelerator type -> the default topology of that slice, for the families docmix knows. The number in
# v4-N and v5p-N counts TensorCores (2 per chip); in v5litepod-N and v6e-N, chips.
_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}
FAMILIES = {"v4": ("v4", 2, _GRIDS_3D), "v5p": ("v5p", 2, _GRIDS_3D), "v5litepod": ("v5e", 1, _GRIDS_2D),
            "v6e": ("v6e", 1, _GRIDS_2D)}


def topology_of(accelerator_type: str) -> str:
    """`v6e-8` -> `v6e:2x4`, `v5p-8` -> `v5p:2x2x1`, `v5litepod-16` -> `v5e:4x4`; ValueError for other names."""
    family, _, count = accelerator_type.partition("-")
    if family not in FAMILIES or not count.isdigit():
        raise ValueError(f"--accelerator_type {accelerator_type!r}: expected FAMILY-N with FAMILY one of "
                         f"{', '.join(FAMILIES)} (or pass --topology)")
    name, cores_per_chip, grids = FAMILIES[family]
    chips = int(count) // cores_per_chip
    if chips not in grids:
        raise ValueError(f"--accelerator_type {accelerator_type!r}: no default topology for {chips} chips; "
                         "pass --topology NAME:AxB[xC]")
    return f"{name}:{grids[chips]}"


def libtpu_missing(what: str = "needs") -> exit_codes.ServiceUnavailable | None:
    """None when the TPU extra (libtpu, for compile-only TPU devices) is installed; else the error naming what to
    install (exit 3 in the exit-code table), for the caller to raise or report."""
    if importlib.util.find_spec("libtpu") is not None:
        return None
    return exit_codes.ServiceUnavailable(f"{what} the TPU extra (libtpu is not installed): pip install -r "
                                         "requirements-tpu.txt")


def topology_devices(name: str, num_slices: int = 1) -> list[Any]:
    """Compile-only devices of a TPU topology such as `v5p:2x2x1`, `v6e:2x4` or `v5e:2x2` (libtpu needed)."""
    # libtpu takes a lock file per process unless told otherwise (another compile, a test run in parallel), and
    # warns when it cannot find TPU workers, which a compile-only topology does not need.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)+", name):
        raise ValueError(f"--topology {name!r}: expected NAME:AxB[xC] such as v5p:2x2x1, v6e:2x4, v5e:2x2")
    try:
        kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs).devices)
    except RuntimeError as e:
        if "TPU support not installed" in str(e):
            raise ModuleNotFoundError("launch.aot needs libtpu: pip install -r requirements-tpu.txt") from None
        raise


def hbm_bytes(device_kind: str) -> int | None:
    return int(HBM_GIB[device_kind] * GIB) if device_kind in HBM_GIB else None
