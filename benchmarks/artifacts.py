"""Every `lowbit prepare` target of the default model, side by side with the GGUF served directly.

Prepares (or reuses) the artifacts under ./artifacts, then measures each engine in turn on
this machine: decode tokens/s for one greedy stream and time to first token, with a
different prompt each round so that no prefix is cached; medians of the rounds. Size and
perplexity come from each artifact's manifest.

    .venv/bin/python benchmarks/artifacts.py [--rounds 5] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from common import ROOT, median  # noqa: I001 - sets sys.path for app/engines

from app.default_model import default_model_path
from engines.base import GenerationRequest, SamplingParams
from engines.prepare.pipeline import prepare
from engines.registry import build_engine

TARGETS = ["openvino-cpu-int8", "openvino-cpu", "openvino-npu", "onnxruntime-cpu"]
TOPICS = ["a lighthouse keeper", "a travelling circus", "a mountain village", "a river pilot", "a night train",
          "a lost map", "an old clockmaker", "a desert well"]


async def measure(engine, rounds: int, max_tokens: int) -> tuple[float, float]:
    tokenizer = engine.tokenizer
    rates, ttfts = [], []
    for index in range(rounds + 1):
        topic = TOPICS[index % len(TOPICS)]
        prompt = tuple(tokenizer.encode(tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Write a long, detailed story about {topic}."}])))
        sent, times, count = time.perf_counter(), [], 0
        request = GenerationRequest(f"bench-{index}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0))
        async for chunk in engine.generate(request):
            if chunk.token_ids:
                times.append(time.perf_counter())
                count += len(chunk.token_ids)
        if index == 0:
            continue  # warm-up
        ttfts.append(times[0] - sent)
        rates.append((count - 1) / (times[-1] - times[0]))
    return median(rates), median(ttfts)


def main(rounds: int, max_tokens: int) -> None:
    out = ROOT / "artifacts"
    artifacts = prepare(default_model_path(), TARGETS, out, progress=lambda line: print(f"  {line}"))
    rows = [("GGUF served directly", "openvino", default_model_path(), "Q4_1 (GGUF)",
             default_model_path().stat().st_size, None)]
    for artifact in artifacts:
        manifest = artifact.manifest
        rows.append((artifact.target, manifest["engine"], artifact.path, manifest["quantization"]["name"],
                     manifest["size_bytes"], manifest["evaluation"]))
    print(f"\n{'target':<22}{'engine':<13}{'scheme':<20}{'size MB':>8}{'ppl':>8}{'ratio':>7}"
          f"{'decode tok/s':>14}{'TTFT ms':>9}")
    for name, kind, path, scheme, size, evaluation in rows:
        engine = build_engine(kind, Path(path), ("CPU",), {})
        engine.start()
        try:
            rate, ttft = asyncio.run(measure(engine, rounds, max_tokens))
        finally:
            engine.stop()
        perplexity = f"{evaluation['perplexity']:.2f}" if evaluation else "-"
        ratio = f"{evaluation['ratio']:.3f}" if evaluation else "-"
        print(f"{name:<22}{kind:<13}{scheme:<20}{size / 1e6:>8.1f}{perplexity:>8}{ratio:>7}"
              f"{rate:>14.1f}{ttft * 1000:>9.1f}")
    reference = artifacts[0].manifest["evaluation"]["reference_perplexity"]
    print(f"reference (unquantized checkpoint) perplexity: {reference:.2f}; {max_tokens} tokens, "
          f"median of {rounds} rounds; the NPU artifact runs on the CPU here")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=96)
    arguments = parser.parse_args()
    main(arguments.rounds, arguments.max_tokens)
