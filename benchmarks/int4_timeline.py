"""Where a Llama-3-8B INT4 batch-1 decode step loses time around its matmuls.

Every program of every INT4 matmul in one captured decode step stamps the GPU's global timer at
its start, after its dependent-launch wait, with x staged, with its last unit summed and at its
end (int4_skinny's TIMELINE, int4_kernels.LaunchTimelines). Printed per matmul, medians over the
layers: the gap from the previous matmul's last program to this one's wait, the prologue (x
staged, RMSNorm's 1 / rms), the loop (where the weights stream), the tail (stream-K's fix-up and
the epilogue), the spread of the programs' ends, and the whole span; a few layers in full; the
step's replay time with and without the stamps. Random weights, prompt 128, 32 new tokens. One
command:

    python benchmarks/int4_timeline.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.native_gpu import replay_ms, run_batch  # noqa: E402
from engines.native import int4_kernels  # noqa: E402
from engines.native.model_runner import ModelRunner, RunnerConfig  # noqa: E402

MATMULS = ("qkv", "o", "gate_up", "down")  # a layer's INT4 launches, in order
START, WAITED, STAGED, SUMMED, END = range(5)  # the stamps' columns


def stamped_step(runner: ModelRunner) -> list[torch.Tensor]:
    """Capture the batch-1 step with stamps, replay it once; per launch: us since the step's first stamp."""
    launches = len(MATMULS) * runner.model_config.num_hidden_layers
    int4_kernels.timelines = int4_kernels.LaunchTimelines(launches, 1056)
    try:
        runner.drop_graphs()
        run_batch(runner, 1, 128, 4)  # captures the step; its launches are the latest in the ring
        print(f"replay with stamps: {replay_ms(runner, 1) * 1000:.0f} us")
        runner._graphs[1][0].replay()
        torch.cuda.synchronize()
        stamps = [t[t[:, START] > 0].double().cpu() for t in int4_kernels.timelines.latest(launches)]
    finally:
        int4_kernels.timelines = None
        runner.drop_graphs()
    origin = min(s[:, START].min() for s in stamps)
    return [(s - origin) / 1000.0 for s in stamps]


def main() -> None:
    runner = ModelRunner(RunnerConfig("cuda", "bfloat16", 16, kv_cache_tokens=8192, quantize="int4"),
                         shape="llama-3-8b")
    run_batch(runner, 1, 128, 4)
    print(f"{torch.cuda.get_device_name()}, llama-3-8b INT4 batch 1")
    print(f"replay without stamps: {replay_ms(runner, 1) * 1000:.0f} us")
    stamps = stamped_step(runner)
    columns = ("gap", "prologue", "loop", "tail", "spread", "span")
    rows: dict[str, list[tuple[float, ...]]] = {name: [] for name in MATMULS}
    print("\nlayer matmul    start   waited   staged   summed  end(med)  end(max)   (us since the step's start)")
    previous_end = None
    for index, s in enumerate(stamps):
        name, layer = MATMULS[index % len(MATMULS)], index // len(MATMULS)
        waited, staged, summed = (s[:, column].median().item() for column in (WAITED, STAGED, SUMMED))
        end, last_end = s[:, END].median().item(), s[:, END].max().item()
        # o_proj follows attention, which is not stamped: no gap or span for it
        gap = waited - previous_end if previous_end is not None and name != "o" else float("nan")
        span = last_end - previous_end if previous_end is not None and name != "o" else float("nan")
        rows[name].append((gap, staged - waited, summed - staged, end - summed, last_end - end, span))
        if layer in (1, len(stamps) // len(MATMULS) // 2):
            print(f"{layer:5d} {name:8s} {s[:, START].min().item():8.2f} {waited:8.2f} {staged:8.2f} {summed:8.2f} "
                  f"{end:9.2f} {last_end:9.2f}")
        previous_end = last_end
    print("\nmedians over the layers, us: " + ", ".join(columns))
    for name in MATMULS:
        medians = torch.tensor(rows[name]).nanmedian(dim=0).values.tolist()  # o's gap and span: all NaN
        print(f"  {name:8s} " + "  ".join(f"{column} {value:5.2f}" for column, value in zip(columns, medians)))


if __name__ == "__main__":
    main()
