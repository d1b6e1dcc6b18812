"""What a single-request worker process has been told: requests to run, aborts, stop.

Both single-request runners (OpenVINO's NPU pipeline, ONNX Runtime GenAI) read their
command pipe the same way: blocking while idle, and between tokens without waiting, so an
abort reaches a running generation at its next token.
"""

from __future__ import annotations

from multiprocessing.connection import Connection

from engines.base import GenerationRequest


class CommandInbox:
    def __init__(self, commands: Connection):
        self.commands = commands
        self.waiting: list[GenerationRequest] = []
        self.aborted: set[str] = set()
        self.stopping = False

    def take(self, block: bool) -> None:
        """Read every command that has arrived; with `block`, wait for at least one."""
        if block:
            self.commands.poll(None)
        while self.commands.poll(0):
            command = self.commands.recv()
            if command[0] == "add":
                self.waiting.append(command[1])
            elif command[0] == "abort":
                self.aborted.add(command[1])
            elif command[0] == "stop":
                self.stopping = True

    def next_request(self) -> GenerationRequest | None:
        """The next request to run, skipping those aborted while they waited (None if none)."""
        while self.waiting:
            request = self.waiting.pop(0)
            if request.request_id not in self.aborted:
                return request
            self.aborted.discard(request.request_id)
        return None

    def is_aborted(self, request_id: str) -> bool:
        return self.stopping or request_id in self.aborted

    def forget(self, request_id: str) -> None:
        self.aborted.discard(request_id)
