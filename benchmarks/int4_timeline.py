"""Where a Llama-3-8B INT4 batch-1 decode step loses time around its matmuls.

Every program of every INT4 matmul in one captured decode step stamps the GPU's global timer at
its start, after its dependent-launch wait, with x staged, with its last unit summed and at its
end, and the SM it ran on (int4_skinny's TIMELINE, int4_kernels.LaunchTimelines). Printed per
matmul, medians over the layers: the gap from the previous matmul's last program to this one's
wait, the prologue (x staged, RMSNorm's 1 / rms), the loop (where the weights stream), the tail
(stream-K's fix-up and the epilogue), the spread of the programs' ends, and the whole span; a few
layers in full; the step's replay time with and without the stamps. Then per matmul how evenly
the SMs stream: each program's units a microsecond in its loop, averaged per SM and launch and
divided by the launch's mean, over several replays: the spread of the SMs' means, the launches'
own noise, the correlation between the means of two halves of the launches (near 1: the speed is
the SM's), and the fastest SMs. Random weights, prompt 128. One command:

    python benchmarks/int4_timeline.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.native_gpu import replay_ms, run_batch  # noqa: E402
from engines.native import int4_kernels  # noqa: E402
from engines.native.model_runner import ModelRunner, RunnerConfig  # noqa: E402

MATMULS = ("qkv", "o", "gate_up", "down")  # a layer's INT4 launches, in order
START, WAITED, STAGED, SUMMED, END, SM = range(6)  # the stamps' columns (SM: the program's %smid)


def stamped_steps(runner: ModelRunner, replays: int) -> list[list[torch.Tensor]]:
    """Capture the batch-1 step with stamps and replay it `replays` times; per replay and launch,
    [programs, 6]: the times in us since the replay's first stamp, then the SM."""
    launches = len(MATMULS) * runner.model_config.num_hidden_layers
    int4_kernels.timelines = int4_kernels.LaunchTimelines(launches, 1056)
    steps = []
    try:
        runner.drop_graphs()
        run_batch(runner, 1, 128, 4)  # captures the step; its launches are the latest in the ring
        print(f"replay with stamps: {replay_ms(runner, 1) * 1000:.0f} us")
        for _ in range(replays):
            runner._graphs[1][0].replay()
            torch.cuda.synchronize()
            stamps = [t[t[:, START] > 0, :SM + 1].double().cpu() for t in int4_kernels.timelines.latest(launches)]
            origin = min(s[:, START].min() for s in stamps)
            for s in stamps:
                s[:, :SM] = (s[:, :SM] - origin) / 1000.0
            steps.append(stamps)
    finally:
        int4_kernels.timelines = None
        runner.drop_graphs()
    return steps


def launch_units(runner: ModelRunner) -> dict[str, int]:
    """The (BLOCK_N-output tile, group) units each matmul's skinny launch shares out."""
    layer = runner.model.layers[0]
    block_n = int4_kernels.SKINNY_SHAPE["block_n"]  # SKINNY_WIDE_SHAPE's too
    units = {}
    for name, linear, gated in (("qkv", layer.self_attn.qkv_proj, False), ("o", layer.self_attn.o_proj, False),
                                ("gate_up", layer.mlp.gate_up_proj, True), ("down", layer.mlp.down_proj, False)):
        weight = linear.int4
        outputs = weight.shape[0] // 2 if gated else weight.shape[0]
        units[name] = triton.cdiv(outputs, block_n) * (weight.shape[1] // weight.group_size)
    return units


def sm_rates(steps: list[list[torch.Tensor]], units: dict[str, int]) -> None:
    """Per matmul: how much of the programs' uneven speed belongs to the SM they run on."""
    print("\nloop rate per SM (units / us, each launch's SM means over the launch's mean):")
    for index, name in enumerate(MATMULS):
        relative = []  # [launches, SMs]
        for stamps in steps:
            for s in stamps[index::len(MATMULS)]:
                programs = s.shape[0]
                pid = torch.arange(programs, dtype=torch.float64)
                count = (torch.floor((pid + 1) * units[name] / programs)  # stream-K shares (int4_skinny)
                         - torch.floor(pid * units[name] / programs))
                rate = count / (s[:, SUMMED] - s[:, STAGED]).clamp_min(1e-3)
                sm = s[:, SM].long()
                sms = int(sm.max()) + 1
                total = torch.zeros(sms, dtype=torch.float64).index_add_(0, sm, rate)
                seen = torch.zeros(sms, dtype=torch.float64).index_add_(0, sm, torch.ones_like(rate))
                mean = total / seen.clamp_min(1)
                relative.append(mean / mean[seen > 0].mean())
        width = min(r.shape[0] for r in relative)
        relative = torch.stack([r[:width] for r in relative])
        means = relative.mean(0)
        halves = torch.corrcoef(torch.stack([relative[0::2].mean(0), relative[1::2].mean(0)]))[0, 1].item()
        fast = (means > 1.04).nonzero().flatten().tolist()
        spread = f"{means.min().item():.3f}-{means.max().item():.3f} (std {means.std().item():.3f})"
        noise = relative.std(0).median().item()
        print(f"  {name:8s} SMs' means {spread}, launch noise {noise:.3f}, halves' correlation {halves:.2f}; "
              f"{len(fast)} SMs above 1.04: {fast}")


def main() -> None:
    runner = ModelRunner(RunnerConfig("cuda", "bfloat16", 16, kv_cache_tokens=8192, quantize="int4"),
                         shape="llama-3-8b")
    run_batch(runner, 1, 128, 4)
    print(f"{torch.cuda.get_device_name()}, llama-3-8b INT4 batch 1")
    print(f"replay without stamps: {replay_ms(runner, 1) * 1000:.0f} us")
    steps = stamped_steps(runner, replays=4)
    stamps = steps[0]
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
    sm_rates(steps, launch_units(runner))


if __name__ == "__main__":
    main()
