"""The native engine on a GPU: correctness against transformers and speed against the roofline.

Llama-3-8B shape with random bf16 weights (the same weights in both), prompt 128 tokens.
Prints one table. This is the baseline of the eager, reference-attention engine (part 1);
Triton kernels and CUDA graphs are measured against it. Runs in one command:

    python benchmarks/native_gpu.py [--shape llama-3-8b] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.base import SamplingParams  # noqa: E402
from engines.native.block_manager import BlockManager  # noqa: E402
from engines.native.model_runner import ModelRunner, RunnerConfig  # noqa: E402
from engines.native.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from engines.native.sequence import Sequence  # noqa: E402


def copy_bandwidth_gbs() -> float:
    size = 1 << 30
    source, target = torch.randint(0, 255, (size,), dtype=torch.uint8, device="cuda"), torch.empty(size, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        target.copy_(source)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * size / sorted(times)[len(times) // 2] / 1e9  # bytes read + written


def run_batch(runner: ModelRunner, batch: int, prompt_len: int, new_tokens: int, seed: int = 0) -> tuple[float, float, list[list[int]]]:
    """(decode tokens/s summed over the batch, prefill seconds, generated ids) for one batch."""
    generator = torch.Generator().manual_seed(seed)
    vocab = runner.model_config.vocab_size
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=batch * prompt_len),
                          BlockManager(runner.num_blocks, runner.config.block_size))
    seqs = [Sequence(f"s{i}", torch.randint(0, vocab, (prompt_len,), generator=generator).tolist(),
                     SamplingParams(max_tokens=new_tokens, temperature=0)) for i in range(batch)]
    for seq in seqs:
        scheduler.add(seq)
    torch.cuda.synchronize()
    started = time.perf_counter()
    batch_seqs, is_prefill = scheduler.schedule()
    scheduler.postprocess(batch_seqs, runner.run(batch_seqs, is_prefill), frozenset())
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - started
    decoded = 0
    started = time.perf_counter()
    while not scheduler.is_idle:
        batch_seqs, is_prefill = scheduler.schedule()
        tokens = runner.run(batch_seqs, is_prefill)
        decoded += len(batch_seqs)
        scheduler.postprocess(batch_seqs, tokens, frozenset())
    torch.cuda.synchronize()
    return decoded / (time.perf_counter() - started), prefill_s, [seq.generated_token_ids for seq in seqs]


def main(shape: str, prompt_len: int, new_tokens: int) -> None:
    rows = []
    bandwidth = copy_bandwidth_gbs()
    runner = ModelRunner(RunnerConfig("cuda", "bfloat16", 16, kv_cache_tokens=72 * (prompt_len + new_tokens) + 4096),
                         shape=shape)
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    roofline = bandwidth * 1e9 / weight_bytes
    rows.append(f"device copy bandwidth {bandwidth:.0f} GB/s; weights {weight_bytes / 1e9:.2f} GB; "
                f"batch-1 roofline {roofline:.0f} tok/s")

    # Correctness against transformers on the same weights.
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM as HFLlama

    c = runner.model_config
    hf_config = HFConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                         rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
                         tie_word_embeddings=c.tie_word_embeddings)
    with torch.device("cuda"):
        hf = HFLlama(hf_config).to(torch.bfloat16).eval()
    hf.load_state_dict(runner.model.state_dict(), strict=False)
    prompt = torch.randint(0, c.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1)).tolist()[0]
    seq = Sequence("check", list(prompt), SamplingParams(max_tokens=32, temperature=0))
    manager = BlockManager(runner.num_blocks, runner.config.block_size)
    manager.allocate(seq)
    ours = runner.logits([seq], True)[0]
    with torch.no_grad():
        theirs = hf(torch.tensor([prompt], device="cuda")).logits[0, -1].float()
    relative = ((ours - theirs).norm() / theirs.norm()).item()
    manager.free(seq)
    with torch.no_grad():
        hf_tokens = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=32, do_sample=False,
                                min_new_tokens=32)[0, prompt_len:].tolist()
    _, _, (native_tokens,) = run_batch(runner, 1, prompt_len, 32, seed=1)
    agree = next((i for i, (a, b) in enumerate(zip(hf_tokens, native_tokens)) if a != b), len(hf_tokens))
    rows.append(f"prefill logits vs transformers: relative error {relative:.2e}, argmax equal: "
                f"{bool(ours.argmax() == theirs.argmax())}; greedy: first {agree}/32 tokens identical")

    # transformers' own decode speed, batch 1, on the same weights. (Its static cache without
    # torch.compile measured 1.3 tok/s on an H100 on 2026-11-23, so it is left out.)
    for cache in ("dynamic",):
        kwargs = {"cache_implementation": "static"} if cache == "static" else {}
        input_ids = torch.tensor([prompt], device="cuda")
        hf.generate(input_ids, max_new_tokens=8, do_sample=False, min_new_tokens=8, **kwargs)
        torch.cuda.synchronize()
        started = time.perf_counter()
        hf.generate(input_ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens, **kwargs)
        torch.cuda.synchronize()
        rows.append(f"transformers {cache} cache, batch 1: {new_tokens / (time.perf_counter() - started):.1f} tok/s "
                    "(prefill included)")
    del hf
    torch.cuda.empty_cache()

    runner.use_graphs = False
    run_batch(runner, 1, prompt_len, 4)  # warm-up
    rate, _, _ = run_batch(runner, 1, prompt_len, new_tokens)
    rows.append(f"native eager (Triton decode attention),  1 concurrent: {rate:8.1f} output tok/s = {rate / roofline:.0%} of roofline")
    runner.use_graphs = True
    for batch in (1, 8, 32, 64):
        run_batch(runner, batch, prompt_len, 4)  # captures this batch size's graph
        rate, prefill_s, _ = run_batch(runner, batch, prompt_len, new_tokens)
        extra = f" = {rate / roofline:.0%} of roofline" if batch == 1 else ""
        rows.append(f"native CUDA graphs, {batch:>2} concurrent: {rate:8.1f} output tok/s{extra}; prefill {prefill_s * 1000:.0f} ms")
    _, ttft, _ = run_batch(runner, 1, 2048, 1)
    rows.append(f"native, TTFT for a 2,048-token prompt: {ttft * 1000:.0f} ms")
    print("\n".join(["", f"{torch.cuda.get_device_name()} | {shape}, bf16 random weights, prompt {prompt_len}, "
                         f"{new_tokens} new tokens"] + rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    arguments = parser.parse_args()
    main(arguments.shape, arguments.prompt, arguments.new_tokens)
