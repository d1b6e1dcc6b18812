"""The `lowbit` command. `lowbit serve` takes every setting as a flag (see `app/settings.py`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
import types
import typing

from pydantic import ValidationError

from app.settings import Settings

log = logging.getLogger("lowbit")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; an absent flag leaves the env variable or default in force."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"LOWBIT_{name.upper()}"
        default = field.default if not isinstance(field.default, tuple) else ",".join(map(str, field.default))
        help_text = f"{field.description or ''} [env {env}; default {default!r}]"
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
            continue
        if name == "model":  # repeatable: several models (or artifacts) side by side
            parser.add_argument(flag, dest=name, action="append", default=argparse.SUPPRESS, metavar="PATH",
                                help=help_text + "; repeat to serve several side by side")
            continue
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, choices=choices,
                            metavar=None if choices else name.split("_")[-1].upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="OpenAI-compatible server for low-bit LLMs")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API")
    _add_setting_flags(serve)
    prepare = commands.add_parser(
        "prepare", help="quantize a model for one or more engines and check its accuracy",
        description="Build an artifact per target from SOURCE (a .gguf file or a Hugging Face checkpoint "
                    "directory; default: the embedded model), refuse it if its perplexity is too far above "
                    "the unquantized reference, and print where it is. Needs `make install-prepare`.")
    prepare.add_argument("source", nargs="?", help="GGUF file or checkpoint directory (default: embedded model)")
    prepare.add_argument("--target", action="append", required=True, dest="targets",
                         help="target to build; repeat for several (openvino-cpu, openvino-cpu-int8)")
    prepare.add_argument("--out", default="artifacts", help="where artifacts go (default: ./artifacts)")
    return parser


def settings_from_args(values: dict[str, object]) -> Settings:
    values = dict(values)
    models = values.pop("model", None)
    if models and len(models) > 1:
        # Several --model flags: one engine each; an artifact's manifest picks its engine and
        # device, and each is served under its own model id.
        values["engines"] = tuple({"model": model} for model in models)
    elif models:
        values["model"] = models[0]
    return Settings(**values)


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    if command == "serve":
        return serve(args)
    if command == "prepare":
        return prepare(args["source"], args["targets"], args["out"])
    return 2


def prepare(source: str | None, targets: list[str], out: str) -> int:
    """`lowbit prepare`: exit 0 when every target passed its gate, 1 when one was refused."""
    from app.default_model import default_model_path

    try:
        from engines.prepare.pipeline import AccuracyGateFailed, prepare as run_prepare
        from engines.prepare.targets import UnknownTarget
    except ImportError as error:  # pragma: no cover - depends on the installation
        print(f"lowbit prepare: conversion tools are missing ({error}); run `make install-prepare`", file=sys.stderr)
        return 2

    def progress(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    try:
        artifacts = run_prepare(source or default_model_path(), targets, out, progress=progress)
    except (UnknownTarget, ValueError, FileNotFoundError) as error:
        print(f"lowbit prepare: {error}", file=sys.stderr)
        return 2
    except AccuracyGateFailed as error:
        print(f"lowbit prepare: refused: {error}", file=sys.stderr)
        return 1
    print(f"{'target':<20}{'perplexity':>11}{'ref':>9}{'ratio':>8}{'size MB':>9}  path")
    for artifact in artifacts:
        evaluation = artifact.manifest["evaluation"]
        print(f"{artifact.target:<20}{evaluation['perplexity']:>11.3f}{evaluation['reference_perplexity']:>9.3f}"
              f"{evaluation['ratio']:>8.3f}{artifact.manifest['size_bytes'] / 1e6:>9.1f}  {artifact.path}")
    print(f"serve one with: lowbit serve --model {artifacts[0].path}")
    return 0


def serve(flag_values: dict[str, object]) -> int:
    import uvicorn

    from app.logs import configure_logging
    from app.server import create_app

    try:
        settings = settings_from_args(flag_values)
    except ValidationError as error:
        for problem in error.errors():
            where = ".".join(str(part) for part in problem["loc"])
            print(f"lowbit serve: invalid setting {where}: {problem['msg']}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        app = create_app(settings)
    except (FileNotFoundError, ValueError) as error:
        print(f"lowbit serve: {error}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            timeout_graceful_shutdown=5, timeout_keep_alive=30)
    server = DrainingServer(config, settings.drain_timeout_s)
    server.run()
    return 0


class DrainingServer:
    """uvicorn's Server, but the first SIGTERM/SIGINT drains before exiting (exit code 0).

    Draining: readiness turns 503 and new requests get 503 with Retry-After while in-flight
    requests finish, up to the drain timeout; what is left is aborted with an error. A
    second signal exits at once.
    """

    def __new__(cls, config, drain_timeout_s: float):
        import uvicorn

        class _Server(uvicorn.Server):
            def __init__(self) -> None:
                super().__init__(config)
                self._loop: asyncio.AbstractEventLoop | None = None
                self._drain_task: asyncio.Task | None = None
                self._is_draining = False

            async def startup(self, sockets=None) -> None:
                self._loop = asyncio.get_running_loop()
                await super().startup(sockets)

            def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
                if not self._is_draining and self._loop is not None and not self.should_exit:
                    self._is_draining = True
                    log.info("received %s: draining for up to %.0f s", signal.Signals(sig).name, drain_timeout_s)
                    self._loop.call_soon_threadsafe(self._begin_drain)
                    return
                self.should_exit = True
                self.force_exit = True

            def _begin_drain(self) -> None:
                self._drain_task = asyncio.get_running_loop().create_task(self._drain())

            async def _drain(self) -> None:
                scheduler = config.app.state.lowbit.scheduler
                aborted = await scheduler.drain(drain_timeout_s)
                log.info("drained: %d request(s) aborted at the drain timeout", aborted)
                self.should_exit = True

        return _Server()


if __name__ == "__main__":
    sys.exit(main())
