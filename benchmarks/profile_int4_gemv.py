"""One INT4 GEMV launch (gate/up of Llama-3-8B, one row) for `ncu` to profile:

    ncu --kernel-name regex:gemv --launch-skip 3 --launch-count 1 python benchmarks/profile_int4_gemv.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.native.int4_kernels import int4_matmul  # noqa: E402
from engines.native.quantization import quantize_rtn  # noqa: E402

weight = quantize_rtn(torch.randn(28672, 4096, device="cuda", dtype=torch.bfloat16) * 0.02)
x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
for _ in range(5):
    int4_matmul(x, weight, gated=True)
torch.cuda.synchronize()
