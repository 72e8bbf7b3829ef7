"""`crma serve STACK`: the OpenAI API over a stack, learning new domains while it serves."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from crma.routing.router import RouteSettings
from crma.settings import add_arguments, from_args


def register(sub: argparse._SubParsersAction) -> None:
    from crma.serve.config import ServeSettings
    from crma.train import TrainConfig

    p = sub.add_parser(
        "serve",
        help="serve a stack through the OpenAI API (chat, completions, files, fine-tuning)",
        description=(
            "Serve STACK over HTTP with the OpenAI API: model 'auto' routes each request to its "
            "domain, a domain's name uses its adapter, 'base' none. Requests are decoded together "
            "across domains. Fine-tuning jobs (POST /v1/fine_tuning/jobs) add domains to the stack "
            "without a restart; files, jobs and events live in STACK/serve/serve.sqlite. A dashboard "
            "at / shows the stack, its jobs' live charts, a prompt box and its forgetting."
        ),
    )
    p.add_argument("stack", type=Path, help="stack directory (written by `crma train`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("CRMA_API_KEY"),
        help="bearer key required on /v1 and the dashboard's data (default: $CRMA_API_KEY; none: no key)",
    )
    p.add_argument("--base", default=None, help="base model (default: the one in the manifest)")
    add_arguments(p, ServeSettings)
    add_arguments(p, RouteSettings)
    add_arguments(p, TrainConfig, prefix="train_")  # defaults of fine-tuning jobs
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from crma.routing.index import CentroidRouter
    from crma.routing.router import serving_router
    from crma.serve.app import create_app
    from crma.serve.config import ServeSettings
    from crma.serve.server import Server
    from crma.stack import Stack
    from crma.train import TrainConfig

    stack = Stack.open(args.stack)  # not a stack: one line and exit 2, before anything listens
    route = from_args(RouteSettings, args)
    if route.router == "fast":  # so is a stack without a serving router
        serving_router(stack.path, CentroidRouter.load(stack))
    if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger(__name__).warning("listening on %s without an API key", args.host)
    server = Server(
        args.stack,
        from_args(ServeSettings, args),
        args.api_key,
        args.base,
        route,
        from_args(TrainConfig, args, prefix="train_"),
    )
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
