"""One shared-memory configuration for the decode step's kernels (imported only on CUDA).

An SM splits its on-chip memory between shared memory and L1 in a few fixed configurations (on an
H100: 0, 8, 16, 32, 64, 100, 132, 164, 196 or 228 KB of shared memory). Triton asks for the most
shared memory for every kernel above 48 KB, so decode attention (143 KB) runs with 28 KB of L1,
and the driver picks for the others: a Llama-3-8B INT4 batch-1 layer ran q/k/v in 100 KB, attention
in 228, o_proj in 64, gate/up in 100 and down in 132 (ncu, session 19).

Measured in session 19 (benchmarks/results/int4_experiments_h100_2026-11-24_session19.txt; step
replays, Llama-3-8B INT4 batch 1, against 2,411 us):
- o_proj launched as attention starts (dependent launch): 2,929 us, the slowdown sessions 7 and 9
  took for o_proj's programs queueing behind attention's;
- every decode kernel asked for 228 KB (28 KB of L1): 2,856 us, and 2,778 with o_proj launched early;
- every decode kernel asked for 164 KB (92 KB of L1): 2,427 us, and 2,387 with o_proj launched early.
So what made the early o_proj slow was the configuration its programs and the matmuls after them
ran in on attention's SMs (28 KB of L1, which the INT4 kernels pay for), not the queueing: asked
for one configuration with L1 to spare, o_proj loads its first weights while attention works.

`share_decode_configuration(kernel)` asks the driver (a preferred carveout, which it treats as a
preference: ncu still showed q/k/v and o_proj in larger configurations, presumably ones their SMs
already held) for DECODE_SHARED_BYTES, or for the smallest configuration that holds as many of
the kernel's programs as its registers and threads allow, whichever is larger: no kernel loses
occupancy to it.
"""

from __future__ import annotations

import ctypes
import functools
import math

import torch

# The smallest H100 configuration that holds a decode-attention program of 256 keys, 8 warps and
# 2 stages (143 KB, attention_kernels.LONG_TILE) with the driver's reserve; 92 KB of L1 stay.
# (100 KB for all, with 1-stage attention, measured the same: 2,385-2,387 us.)
DECODE_SHARED_BYTES = 164 * 1024
RESERVED_PER_PROGRAM = 1024  # shared memory the driver keeps for each resident program (sm_80 and later)

_PREFERRED_CARVEOUT = 9  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
_MAX_SHARED_PER_SM = 81  # CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR

_configured: set[int] = set()  # handles of the kernels already asked


@functools.cache
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


@functools.cache
def _max_shared_per_sm(index: int) -> int:
    device, value = ctypes.c_int(), ctypes.c_int()
    _check(_driver().cuDeviceGet(ctypes.byref(device), index), "cuDeviceGet")
    _check(_driver().cuDeviceGetAttribute(ctypes.byref(value), _MAX_SHARED_PER_SM, device), "cuDeviceGetAttribute")
    return value.value


def _check(status: int, call: str) -> None:
    if status != 0:
        raise RuntimeError(f"{call} failed with CUDA driver error {status}")


def carveout_percent(resident_bytes: int, max_shared: int) -> int:
    """The preferred carveout (percent of `max_shared`) for a kernel whose resident programs need
    `resident_bytes`. The driver rounds a carveout up to the next configuration, so the floor
    of DECODE_SHARED_BYTES lands on it exactly and the ceiling of a larger need covers it."""
    if resident_bytes <= DECODE_SHARED_BYTES:
        return min(100, 100 * DECODE_SHARED_BYTES // max_shared)
    return min(100, math.ceil(100 * resident_bytes / max_shared))


def share_decode_configuration(kernel) -> None:
    """Asks the driver to run `kernel` (what a Triton launch returns) in the decode step's shared
    memory configuration (module docstring); once per compiled kernel, before any CUDA graph
    captures it (the graphs' warm-up launches every kernel first)."""
    function = getattr(kernel, "function", None)
    if not function or function in _configured:
        return
    shared = kernel.metadata.shared
    threads = kernel.metadata.num_warps * 32
    programs = ctypes.c_int()
    _check(_driver().cuOccupancyMaxActiveBlocksPerMultiprocessor(
        ctypes.byref(programs), ctypes.c_void_p(function), threads, ctypes.c_size_t(shared)),
        "cuOccupancyMaxActiveBlocksPerMultiprocessor")
    percent = carveout_percent(programs.value * (shared + RESERVED_PER_PROGRAM),
                               _max_shared_per_sm(torch.cuda.current_device()))
    _check(_driver().cuFuncSetAttribute(ctypes.c_void_p(function), _PREFERRED_CARVEOUT, percent),
           "cuFuncSetAttribute")
    _configured.add(function)
