"""`crma generate STACK PROMPT` and `crma chat STACK`: answer with the right domain's adapter."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crma.errors import UserError
from crma.routing.router import RouteSettings
from crma.settings import add_arguments, from_args


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("stack", type=Path, help="stack directory (written by `crma train`)")
    p.add_argument(
        "--domain",
        default="auto",
        help="domain whose adapter answers, or 'auto' to route each prompt (default: auto)",
    )
    p.add_argument("--base", default=None, help="base model (default: the one in the manifest)")
    from crma.generate import GenerateSettings

    add_arguments(p, GenerateSettings)
    add_arguments(p, RouteSettings)


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "generate",
        help="answer one prompt with a stack (routed to the right domain)",
        description="Generate a reply to PROMPT. With --domain auto (the default) the router "
        "picks the domain; the chosen domain and its confidence go to stderr, the reply to stdout.",
    )
    _common(g)
    g.add_argument("prompt", help="the prompt ('-': read it from stdin)")
    g.set_defaults(func=generate)

    c = sub.add_parser(
        "chat",
        help="interactive chat with a stack, showing which domain answers",
        description="Chat in the terminal. Each turn is routed on your message (unless --domain "
        "is given). Commands: /reset forgets the conversation, /quit leaves.",
    )
    _common(c)
    c.set_defaults(func=chat)


def _open(args: argparse.Namespace):
    from crma.generate import GenerateSettings, load_stack

    settings, route = from_args(GenerateSettings, args), from_args(RouteSettings, args)
    model = load_stack(args.stack, args.base, route)
    if args.domain != "auto":
        model.check_domain(args.domain)
    return model, settings


def _who(answer) -> str:
    if answer.domain is None:
        return "no adapter (below threshold)" if answer.confidence is not None else "no adapter"
    conf = f", confidence {answer.confidence:.2f}" if answer.confidence is not None else ""
    return f"{answer.domain}{conf}"


def generate(args: argparse.Namespace) -> None:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UserError("prompt is empty")
    model, settings = _open(args)
    answer = model.generate(prompt, args.domain, settings)
    print(f"[{_who(answer)}]", file=sys.stderr)
    print(answer.text)


def chat(args: argparse.Namespace) -> None:
    model, settings = _open(args)
    print(f"{args.stack}: domains {', '.join(model.domains)}. /reset, /quit.", file=sys.stderr)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            history = []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        answer = model.generate(history, args.domain, settings)
        history.append({"role": "assistant", "content": answer.text})
        print(f"[{_who(answer)}] {answer.text}", flush=True)
