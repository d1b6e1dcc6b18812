"""The native engine on a GPU: correctness against transformers and speed against the roofline.

Llama-3-8B shape with random weights (the same weights in every engine), prompt 128 tokens,
256 generated, greedy. Prints one table:
- the roofline: measured device copy bandwidth / bytes of weights a decode step reads per token;
- transformers on the same weights: dynamic cache, static cache, and its own paged continuous
  batching (`generate_batch` with paged sdpa attention) at 8 / 32 / 64 requests;
- the native engine in bf16 and INT4 (W4A16, RTN at load), through the engine's StepLoop with
  decode steps launched ahead: batch 1 (beside it, step by step: alternating runs, medians),
  8 / 32 / 64 concurrent,
  time to first token of a 2,048-token prompt; INT4 with the LM head in INT4 too (batch 1);
  SmolLM2-135M's shape at batch 1; INT4 at batch 1 again with every kernel launched only after
  the one before it has finished (no dependent launch: engines/native/kernels.py), and after a
  4,096-token prompt with decode attention's context in chunks and in one (attention_kernels.py).
One command:

    python benchmarks/native_gpu.py [--quick] [--shape llama-3-8b] [--new-tokens 256]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_timing import median_replay_ms  # noqa: E402
from engines.base import SamplingParams  # noqa: E402
from engines.native import attention_kernels, kernels  # noqa: E402
from engines.native.block_manager import BlockManager  # noqa: E402
from engines.native.model import NAMED_SHAPES, random_state  # noqa: E402
from engines.native.model_runner import ModelRunner, RunnerConfig  # noqa: E402
from engines.native.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from engines.native.sequence import Sequence  # noqa: E402
from engines.native.step_loop import StepLoop  # noqa: E402

CONCURRENCY = (8, 32, 64)


def copy_bandwidth_gbs() -> float:
    size = 1 << 30
    source = torch.randint(0, 255, (size,), dtype=torch.uint8, device="cuda")
    target = torch.empty(size, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        target.copy_(source)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * size / statistics.median(times) / 1e9  # bytes read + written


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=generator).tolist() for _ in range(batch)]


def run_batch(runner: ModelRunner, batch: int, prompt_len: int, new_tokens: int, seed: int = 0,
              run_ahead: bool = True):
    """(decode tok/s summed over the batch, prefill s, end-to-end output tok/s, generated ids),
    through the engine's StepLoop (`run_ahead`: decode steps launched before the host has read
    the previous one's tokens, as the engine does on a GPU)."""
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=max(8192, batch * prompt_len)),
                          BlockManager(runner.num_blocks, runner.config.block_size))
    loop = StepLoop(scheduler, runner, frozenset(), run_ahead)
    seqs = [Sequence(f"s{i}", ids, SamplingParams(max_tokens=new_tokens, temperature=0))
            for i, ids in enumerate(prompts(batch, prompt_len, runner.model_config.vocab_size, seed))]
    for seq in seqs:
        scheduler.add(seq)
    torch.cuda.synchronize()
    started = time.perf_counter()
    while scheduler.waiting:  # prefill every prompt (several steps when they exceed the token budget)
        loop.step()
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - started
    decoded = 0
    decode_started = time.perf_counter()
    while not loop.is_idle:
        decoded += len(loop.step())
    torch.cuda.synchronize()
    finished = time.perf_counter()
    rate = decoded / (finished - decode_started)
    return rate, prefill_s, (decoded + batch) / (finished - started), [seq.generated_token_ids for seq in seqs]


def replay_ms(runner: ModelRunner, bucket: int) -> float:
    """GPU time of one captured decode step alone (no host work between steps)."""
    graph, _ = runner._graphs[bucket]
    return median_replay_ms(graph, replays=30)


def native_rows(label: str, runner: ModelRunner, bandwidth: float, prompt_len: int, new_tokens: int,
                concurrency=CONCURRENCY, ttft: bool = True) -> tuple[list[str], float]:
    rows = []
    weight_bytes = runner.model.weight_bytes_per_token()
    roofline = bandwidth * 1e9 / weight_bytes
    rows.append(f"{label}: weights read per token {weight_bytes / 1e9:.2f} GB -> batch-1 roofline {roofline:.0f} tok/s")
    run_batch(runner, 1, prompt_len, 4)  # captures the batch-1 graph
    # Run-ahead on and off alternately, medians: the host's share moves by tens of us between runs.
    ahead, step_by_step = [], []
    for _ in range(3):
        ahead.append(run_batch(runner, 1, prompt_len, new_tokens)[0])
        step_by_step.append(run_batch(runner, 1, prompt_len, new_tokens, run_ahead=False)[0])
    rate, serial = statistics.median(ahead), statistics.median(step_by_step)
    step_ms = replay_ms(runner, 1)
    rows.append(f"{label}, batch 1: {rate:8.1f} tok/s = {rate / roofline:.0%} of roofline "
                f"(graph replay alone {step_ms:.2f} ms/token = {1000 / step_ms:.0f} tok/s; step by step, "
                f"no run-ahead: {serial:.1f} tok/s, run-ahead / step by step {rate / serial:.3f})")
    for batch in concurrency:
        run_batch(runner, batch, prompt_len, 4)
        rate, prefill_s, end_to_end, _ = run_batch(runner, batch, prompt_len, new_tokens)
        rows.append(f"{label}, {batch:>2} concurrent: {rate:8.1f} decode tok/s; {end_to_end:8.1f} output tok/s "
                    f"with prefill ({prefill_s * 1000:.0f} ms)")
    if ttft:
        run_batch(runner, 1, 2048, 1)
        times = [run_batch(runner, 1, 2048, 1, seed=s)[1] for s in range(3)]
        rows.append(f"{label}, TTFT of a 2,048-token prompt: {statistics.median(times) * 1000:.0f} ms")
    return rows, rate


@contextlib.contextmanager
def graphs_captured_with(runner: ModelRunner, module, name: str, value):
    """Within: `module.name` set to `value` (a switch read at launch time) and the runner's decode
    graphs captured afresh with it; after: the old value, and graphs captured again when needed."""
    previous = getattr(module, name)
    setattr(module, name, value)
    runner.drop_graphs()
    try:
        yield
    finally:
        setattr(module, name, previous)
        runner.drop_graphs()


def serial_launch_row(label: str, runner: ModelRunner, prompt_len: int, new_tokens: int) -> str:
    """Batch 1 with dependent launch switched off, to set beside the default row."""
    with graphs_captured_with(runner, kernels, "DEPENDENT_LAUNCH", False):
        run_batch(runner, 1, prompt_len, 4)  # captures the batch-1 graph again
        rate, _, _, _ = run_batch(runner, 1, prompt_len, new_tokens)
        step_ms = replay_ms(runner, 1)
    return (f"{label}, batch 1, no dependent launch: {rate:8.1f} tok/s "
            f"(graph replay alone {step_ms:.2f} ms/token = {1000 / step_ms:.0f} tok/s)")


def long_context_row(label: str, runner: ModelRunner, prompt_len: int = 4096, new_tokens: int = 128) -> str:
    """Batch 1 after a long prompt, decode attention with the context cut into chunks (the
    default) and in one chunk per KV head, alternating, medians of 3."""
    chunked, single = [], []
    for _ in range(3):
        for max_splits, rates in ((attention_kernels.MAX_SPLITS, chunked), (1, single)):
            with graphs_captured_with(runner, attention_kernels, "MAX_SPLITS", max_splits):
                run_batch(runner, 1, prompt_len, 4)
                rates.append(run_batch(runner, 1, prompt_len, new_tokens)[0])
    split, one = statistics.median(chunked), statistics.median(single)
    return (f"{label}, batch 1 after a {prompt_len:,}-token prompt: {split:8.1f} tok/s "
            f"(attention in one chunk per KV head: {one:.1f} tok/s; {split / one:.2f}x)")


def generate_rate(hf, input_ids: torch.Tensor, new_tokens: int, cache: str) -> str:
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        # The first call compiles (static cache) and warms up; the second is timed.
        hf.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
        torch.cuda.synchronize()
        started = time.perf_counter()
        hf.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
        torch.cuda.synchronize()
    rate = new_tokens / (time.perf_counter() - started)
    return f"transformers {cache} cache, batch 1: {rate:8.1f} tok/s (prefill included)"


def transformers_rows(rows: list[str], state, shape: str, runner: ModelRunner, prompt_len: int, new_tokens: int,
                      static: bool) -> None:
    from transformers import GenerationConfig
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM as HFLlama

    c = NAMED_SHAPES[shape]
    hf_config = HFConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                         rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
                         tie_word_embeddings=c.tie_word_embeddings, eos_token_id=None, bos_token_id=None,
                         pad_token_id=0)
    with torch.device("meta"):
        hf = HFLlama(hf_config)
    hf.load_state_dict(state, strict=False, assign=True)  # shares the tensors: no second copy
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_config, device="cuda")  # its buffers were left on meta
    hf.eval()
    on_meta = [name for name, tensor in list(hf.named_parameters()) + list(hf.named_buffers()) if tensor.is_meta]
    if on_meta:
        raise RuntimeError(f"transformers model still has meta tensors: {on_meta[:5]}")
    prompt = prompts(1, prompt_len, c.vocab_size, seed=1)[0]
    seq = Sequence("check", list(prompt), SamplingParams(max_tokens=32, temperature=0))
    manager = BlockManager(runner.num_blocks, runner.config.block_size)
    manager.allocate(seq)
    ours = runner.logits([seq], True)[0]
    manager.free(seq)
    input_ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        theirs = hf(input_ids).logits[0, -1].float()
        hf_tokens = hf.generate(input_ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, prompt_len:].tolist()
    relative = ((ours - theirs).norm() / theirs.norm()).item()
    # The noise floor: transformers in bf16 against transformers in fp32 on the same weights.
    with torch.device("meta"):
        hf32 = HFLlama(hf_config)
    hf32.load_state_dict({name: tensor.float() for name, tensor in state.items()}, strict=False, assign=True)
    hf32.model.rotary_emb = type(hf32.model.rotary_emb)(hf_config, device="cuda")
    with torch.no_grad():
        exact = hf32.eval()(input_ids).logits[0, -1].float()
    del hf32
    torch.cuda.empty_cache()
    rows.append(f"prefill logits vs transformers fp32: native bf16 {((ours - exact).norm() / exact.norm()).item():.2e}, "
                f"transformers bf16 {((theirs - exact).norm() / exact.norm()).item():.2e} (the bf16 noise floor)")
    _, _, _, (native_tokens,) = run_batch(runner, 1, prompt_len, 32, seed=1)
    agree = next((i for i, (a, b) in enumerate(zip(hf_tokens, native_tokens)) if a != b), len(hf_tokens))
    rows.append(f"bf16 prefill logits vs transformers: relative error {relative:.2e}, top-1 equal: "
                f"{bool(ours.argmax() == theirs.argmax())}; greedy: first {agree}/32 tokens identical")
    rows.append(generate_rate(hf, input_ids, new_tokens, "dynamic"))
    for implementation in ("paged|sdpa", "sdpa_paged"):
        try:
            hf.set_attn_implementation(implementation)
            break
        except Exception as error:  # noqa: BLE001 - the name changed between transformers versions
            rows.append(f"transformers: attn_implementation {implementation!r} refused ({type(error).__name__})")
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    for batch in CONCURRENCY:
        inputs = prompts(batch, prompt_len, c.vocab_size, seed=batch)
        try:
            with torch.no_grad():
                hf.generate_batch(inputs=inputs[:2], generation_config=config, progress_bar=False)  # warm-up
                torch.cuda.synchronize()
                started = time.perf_counter()
                outputs = hf.generate_batch(inputs=inputs, generation_config=config, progress_bar=False)
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            generated = sum(len(output.generated_tokens) for output in outputs.values())
            rows.append(f"transformers generate_batch ({implementation}), {batch:>2} requests: "
                        f"{generated / elapsed:8.1f} output tok/s with prefill")
        except Exception as error:  # noqa: BLE001 - report, keep benchmarking
            rows.append(f"transformers generate_batch, {batch} requests: failed ({type(error).__name__}: {error})"[:300])
    hf.set_attn_implementation("sdpa")
    if static:
        rows.append(generate_rate(hf, input_ids, new_tokens, "static"))
    del hf
    torch.cuda.empty_cache()


class Table(list):
    """Rows that are also printed as they come, so a run cut short still reports what it measured."""

    def append(self, row: str) -> None:
        print(row, flush=True)
        super().append(row)

    def __iadd__(self, rows):
        for row in rows:
            self.append(row)
        return self


def main(shape: str, prompt_len: int, new_tokens: int, quick: bool, static: bool) -> None:
    bandwidth = copy_bandwidth_gbs()
    rows = Table([f"device copy bandwidth {bandwidth:.0f} GB/s"])
    kv_tokens = max(CONCURRENCY) * (prompt_len + new_tokens + 16) + 4096
    state = random_state(NAMED_SHAPES[shape], "cuda", torch.bfloat16)
    runner = ModelRunner(RunnerConfig("cuda", "bfloat16", 16, kv_cache_tokens=kv_tokens), shape=shape, state=state)
    rows += native_rows("native bf16", runner, bandwidth, prompt_len, new_tokens)[0]
    check = prompts(1, prompt_len, runner.model_config.vocab_size, seed=3)[0]
    reference_logits = logits_of(runner, check)
    quantized = ModelRunner(RunnerConfig("cuda", "bfloat16", 16, kv_cache_tokens=kv_tokens, quantize="int4"),
                            shape=shape, state=state)
    relative = ((logits_of(quantized, check) - reference_logits).norm() / reference_logits.norm()).item()
    rows.append(f"INT4 (RTN g128) prefill logits vs bf16: relative error {relative:.2e} (random weights)")
    rows += native_rows("native int4", quantized, bandwidth, prompt_len, new_tokens)[0]
    rows.append(serial_launch_row("native int4", quantized, prompt_len, new_tokens))
    rows.append(long_context_row("native int4", quantized))
    del quantized
    torch.cuda.empty_cache()
    head = ModelRunner(RunnerConfig("cuda", "bfloat16", 16, kv_cache_tokens=kv_tokens, quantize="int4",
                                    quantize_lm_head=True), shape=shape, state=state)
    rows += native_rows("native int4 + INT4 LM head", head, bandwidth, prompt_len, new_tokens, concurrency=(),
                        ttft=False)[0]
    del head
    torch.cuda.empty_cache()
    rows.append(int4_kernels_vs_reference(prompt_len))
    for quantize in (None, "int4"):
        small = ModelRunner(RunnerConfig("cuda", "bfloat16", 16, kv_cache_tokens=8192, quantize=quantize),
                            shape="smollm2-135m")
        rows += native_rows(f"smollm2-135m {quantize or 'bf16'}", small, bandwidth, prompt_len, new_tokens,
                            concurrency=(), ttft=False)[0]
        if quantize:
            rows.append(serial_launch_row(f"smollm2-135m {quantize}", small, prompt_len, new_tokens))
        del small
    if not quick:
        runner.use_graphs = False
        run_batch(runner, 1, prompt_len, 4)
        rate, _, _, _ = run_batch(runner, 1, prompt_len, 64)
        rows.append(f"native bf16, batch 1, eager (no CUDA graphs): {rate:8.1f} tok/s")
        runner.use_graphs = True
        transformers_rows(rows, state, shape, runner, prompt_len, new_tokens, static)
    print("\n".join(["", f"{torch.cuda.get_device_name()} | {shape}, random weights, prompt {prompt_len}, "
                         f"{new_tokens} new tokens, greedy"] + rows))


def int4_kernels_vs_reference(prompt_len: int) -> str:
    """SmolLM2's shape in INT4: the GPU kernels against the CPU reference path (dequantize, fp32)."""
    state = random_state(NAMED_SHAPES["smollm2-135m"], "cuda", torch.bfloat16, seed=4)
    cpu_state = {name: tensor.cpu() for name, tensor in state.items()}
    gpu = ModelRunner(RunnerConfig("cuda", "bfloat16", 16, 4096, quantize="int4"), shape="smollm2-135m", state=state)
    cpu = ModelRunner(RunnerConfig("cpu", "float32", 16, 4096, quantize="int4"), shape="smollm2-135m", state=cpu_state)
    prompt = prompts(1, prompt_len, gpu.model_config.vocab_size, seed=5)[0]
    expected = logits_of(cpu, prompt)
    got = logits_of(gpu, prompt).cpu()
    relative = ((got - expected).norm() / expected.norm()).item()
    return (f"smollm2-135m INT4, GPU kernels vs CPU reference on the same INT4 weights: prefill logits relative error "
            f"{relative:.2e}, top-1 equal: {bool(got.argmax() == expected.argmax())}")


def logits_of(runner: ModelRunner, prompt: list[int]) -> torch.Tensor:
    seq = Sequence("logits", list(prompt), SamplingParams(max_tokens=1, temperature=0))
    manager = BlockManager(runner.num_blocks, runner.config.block_size)
    manager.allocate(seq)
    logits = runner.logits([seq], True)[0]
    manager.free(seq)
    return logits


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="native engine only (no transformers)")
    parser.add_argument("--no-static", action="store_true", help="skip transformers' static cache (it compiles)")
    arguments = parser.parse_args()
    main(arguments.shape, arguments.prompt, arguments.new_tokens, arguments.quick, not arguments.no_static)
