"""ONNX Runtime GenAI in a worker process: one `og.Model`, one generator per request.

`Generator.generate_next_token` holds the GIL: generators on several threads of one
process made no more tokens per second than one (measured: 1 stream 116 tok/s, 2 and 4
threads 103 tok/s together), while two processes made 110 + 110. So each worker runs one
request at a time, with ONNX Runtime's intra-op threads set by the parent, and the engine
runs several workers. Protocol: see `engines/worker_process.py`.
"""

from __future__ import annotations

import json
import signal
import sys
from multiprocessing.connection import Connection

from engines.base import FinishReason, GenerationRequest
from engines.worker_inbox import CommandInbox


def main(argv: list[str]) -> None:
    """`python -m engines.onnxruntime_worker COMMANDS_FD OUTPUTS_FD MODEL_DIR OPTIONS_JSON`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this process ends
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    commands_fd, outputs_fd, model_dir, options_json = argv
    options = json.loads(options_json)
    commands = Connection(int(commands_fd), writable=False)
    outputs = Connection(int(outputs_fd), readable=False)
    import onnxruntime_genai as og

    provider = options["provider"]
    try:
        config = og.Config(model_dir)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": options["intra_op_threads"]}}}}))
        if provider.lower() != "cpu":
            config.clear_providers()
            config.append_provider(provider)
        model = og.Model(config)
    except Exception as error:  # noqa: BLE001 - reported to the parent, which raises
        outputs.send(("load_failed", [(provider, f"{type(error).__name__}: {error}")]))
        return
    outputs.send(("loaded", provider.upper(), [(provider.upper(), None)], True))
    try:
        _Runner(og, model, commands, outputs, set(options["eos_token_ids"])).run()
    except (EOFError, BrokenPipeError):
        pass  # the parent went away


class _Runner:
    def __init__(self, og, model, commands: Connection, outputs: Connection, eos_token_ids: set[int]):
        self.og, self.model = og, model
        self.inbox = CommandInbox(commands)
        self.outputs = outputs
        self.eos_token_ids = eos_token_ids

    def run(self) -> None:
        while not self.inbox.stopping:
            self.inbox.take(block=not self.inbox.waiting)
            request = None if self.inbox.stopping else self.inbox.next_request()
            if request is None:
                continue
            try:
                self._generate(request)
            except Exception as error:  # noqa: BLE001
                self.outputs.send(("failed", [request.request_id], f"{type(error).__name__}: {error}"))

    def _generate(self, request: GenerationRequest) -> None:
        og, sampling = self.og, request.sampling
        params = og.GeneratorParams(self.model)
        options = {"max_length": len(request.prompt_token_ids) + sampling.max_tokens,
                   "do_sample": not sampling.is_greedy}
        if not sampling.is_greedy:
            options.update(temperature=sampling.temperature, top_p=sampling.top_p)
            if sampling.top_k > 0:
                options["top_k"] = sampling.top_k
            if sampling.seed is not None:
                options["random_seed"] = sampling.seed
        params.set_search_options(**options)
        generator = og.Generator(self.model, params)
        generator.append_tokens(list(request.prompt_token_ids))
        stop_ids = self.eos_token_ids | set(sampling.stop_token_ids)
        generated = 0
        while True:
            self.inbox.take(block=False)
            if self.inbox.is_aborted(request.request_id):
                self.inbox.forget(request.request_id)
                self.outputs.send(("tokens", [(request.request_id, (), FinishReason.ABORT.value)]))
                return
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            generated += 1
            finish = None
            if token in stop_ids:
                finish = FinishReason.STOP.value
            elif generated >= sampling.max_tokens or generator.is_done():
                finish = FinishReason.LENGTH.value
            self.outputs.send(("tokens", [(request.request_id, (token,), finish)]))
            if finish is not None:
                return


if __name__ == "__main__":
    main(sys.argv[1:])
