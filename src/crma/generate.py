"""Answering prompts with a stack: pick the domain (given, or routed), generate, batch across domains.

from crma.generate import load_stack
stack = load_stack("my-stack")
answer = stack.generate("What does the GPL require?")   # domain="auto": routed
print(answer.domain, answer.confidence, answer.text)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crma.batching import pad, pad_id
from crma.continual import ContinualModel
from crma.errors import UserError
from crma.routing.router import Route, Router, RouteSettings, adapter_key
from crma.settings import SettingError, Settings, setting
from crma.stack import Stack

AUTO = "auto"
BASE = "__base__"  # PEFT's name for "no adapter" in mixed batches
SHARED = "(shared)"  # methods without task id: their one/summed adapters answer everything


@dataclass
class GenerateSettings(Settings):
    """Decoding settings."""

    max_new_tokens: int = setting(64, "tokens to generate at most", ge=1)
    min_new_tokens: int = setting(
        0, "tokens to generate at least (end-of-text ignored before)", ge=0
    )
    temperature: float = setting(0.0, "sampling temperature; 0: greedy", ge=0)
    top_p: float = setting(1.0, "nucleus sampling mass (with temperature > 0)", gt=0, le=1)
    seed: int = setting(0, "sampling seed", ge=0)
    chat_template: bool = setting(
        True, "wrap the prompt in the base's chat template when it has one (instruct models)"
    )

    def check_together(self) -> None:
        if self.min_new_tokens > self.max_new_tokens:
            allowed = f"at most max_new_tokens ({self.max_new_tokens})"
            raise SettingError("min_new_tokens", self.min_new_tokens, allowed)


@dataclass
class Answer:
    """A generated reply and who answered it (`domain` None: base + backbone, no adapter)."""

    text: str
    domain: str | None
    confidence: float | None  # None when the domain was given, not routed
    new_tokens: int


def load_stack(
    path: str | Path, base: str | None = None, route: RouteSettings | None = None
) -> StackModel:
    """Open a stack for inference; `base` overrides the model named in its manifest."""
    from crma.model import base_model_id, load_base

    stack = Stack.open(path)
    name = base or stack.manifest["base_model"]["name"]
    cm = ContinualModel.open_or_create(path, lambda: load_base(name), base_model_id(name))
    cm.engine.model.eval()
    return StackModel(cm, route)


class StackModel:
    """A stack ready to answer: routing, generation and mixed-domain batches."""

    def __init__(self, cm: ContinualModel, route: RouteSettings | None = None):
        self.cm = cm
        self.router = Router(cm, route)

    @property
    def domains(self) -> list[str]:
        return list(self.cm.stack.domains)

    @property
    def tokenizer(self):
        return self.cm.engine.tokenizer

    def check_domain(self, domain: str) -> str:
        """`domain` if the stack has it, else a one-line error listing the stack's domains."""
        if domain not in self.domains:
            raise UserError(
                f"{self.cm.stack.path}: no domain {domain!r}; the stack has: "
                f"{', '.join(self.domains) or 'none'} (or use 'auto')"
            )
        return domain

    def route(self, prompts: list[str]) -> list[Route]:
        return self.router.route_texts(prompts)

    def resolve(
        self, prompts: list[str], domain: str = AUTO
    ) -> list[tuple[str | None, float | None]]:
        """(domain, confidence) per prompt: routed for 'auto', else the given domain."""
        if domain != AUTO:
            return [(self.check_domain(domain), None)] * len(prompts)
        if not self.domains:
            return [(None, None)] * len(prompts)
        if not self.cm.method.needs_task_id:
            return [(SHARED, None)] * len(prompts)
        return [(r.domain, r.confidence) for r in self.route(prompts)]

    def adapters(self, domain: str | None) -> str | list[str] | None:
        """Adapters that answer for `domain` (None: base + backbone only)."""
        if domain == SHARED:
            domain = self.domains[-1]
        return self.cm.method.eval_adapters(domain) if domain else None

    def encode(self, prompt: str | list[dict[str, str]], chat_template: bool = True) -> list[int]:
        """Token ids of a prompt, or of a conversation, with the chat template where wanted."""
        tok = self.tokenizer
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if chat_template and getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in messages)
        return tok(text, add_special_tokens=True)["input_ids"]

    def generate(
        self,
        prompt: str | list[dict[str, str]],
        domain: str = AUTO,
        settings: GenerateSettings | None = None,
    ) -> Answer:
        """Answer one prompt (or conversation; routed on its last user message)."""
        s = settings or GenerateSettings()
        text = prompt if isinstance(prompt, str) else _last_user(prompt)
        ((chosen, confidence),) = self.resolve([text], domain)
        ids = self.encode(prompt, s.chat_template)
        out = self.generate_ids([ids], [chosen], s)[0]
        return Answer(
            self.tokenizer.decode(out, skip_special_tokens=True).strip(),
            chosen,
            confidence,
            len(out),
        )

    def generate_many(
        self, prompts: list[str], domain: str = AUTO, settings: GenerateSettings | None = None
    ) -> list[Answer]:
        """Answer several prompts in one batch, each through its own domain's adapter."""
        s = settings or GenerateSettings()
        chosen = self.resolve(prompts, domain)
        outs = self.generate_ids(
            [self.encode(p, s.chat_template) for p in prompts], [d for d, _ in chosen], s
        )
        return [
            Answer(self.tokenizer.decode(o, skip_special_tokens=True).strip(), d, c, len(o))
            for o, (d, c) in zip(outs, chosen)
        ]

    @torch.no_grad()
    def generate_ids(
        self, ids_list: list[list[int]], domains: list[str | None], settings: GenerateSettings
    ) -> list[list[int]]:
        """New token ids per row; rows may go to different domains (one mixed batch)."""
        engine, s = self.cm.engine, settings
        device = next(engine.model.parameters()).device
        ids, mask = (t.to(device) for t in pad(ids_list, pad_id(self.tokenizer), side="left"))
        kwargs: dict[str, Any] = {
            "max_new_tokens": s.max_new_tokens,
            "min_new_tokens": s.min_new_tokens or None,
            "do_sample": s.temperature > 0,
            "pad_token_id": pad_id(self.tokenizer),
        }
        if s.temperature > 0:
            kwargs.update(temperature=s.temperature, top_p=s.top_p)
            torch.manual_seed(s.seed)
        if self.tokenizer.eos_token_id is not None:
            kwargs["eos_token_id"] = self.tokenizer.eos_token_id
        adapter_sets = {adapter_key(self.adapters(d)) for d in domains}
        if len(adapter_sets) == 1:
            with engine.inference(self.adapters(domains[0])) as model:
                out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        else:
            names = adapter_names(self.cm, domains)
            with engine.inference(None if engine.peft is None else engine.adapters[0]) as model:
                out = model.generate(
                    input_ids=ids, attention_mask=mask, adapter_names=names, **kwargs
                )
        return [
            _strip(row[ids.shape[1] :].tolist(), kwargs.get("eos_token_id"), kwargs["pad_token_id"])
            for row in out
        ]


# -- mixed-domain batches ------------------------------------------------------------------------
def adapter_names(cm: ContinualModel, domains: list[str | None]) -> list[str]:
    """PEFT `adapter_names` for a batch: each row's single adapter, or '__base__' for none.

    Only methods with one adapter per domain can mix rows; methods that sum all adapters
    (O-LoRA, InfLoRA) or share one (naive) use the same weights for every row anyway.
    """
    names = []
    for d in domains:
        adapters = cm.method.eval_adapters(d) if d else None
        if isinstance(adapters, list):
            if len(adapters) != 1:
                raise UserError(
                    f"method {cm.method.name}: sums {len(adapters)} adapters per domain, "
                    "so rows cannot go to different adapters; batch them without domains"
                )
            adapters = adapters[0]
        names.append(adapters or BASE)
    return names


@torch.no_grad()
def mixed_logits(
    cm: ContinualModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    domains: list[str | None],
) -> torch.Tensor:
    """Logits (B, T, V) of one forward pass where row b uses domain `domains[b]`'s adapter.

    The CRMA backbone (shared by every domain) applies to all rows alike.
    """
    engine = cm.engine
    if engine.peft is None:
        with engine.inference(None) as model:
            return model(input_ids=input_ids, attention_mask=attention_mask).logits
    with engine.inference(engine.adapters[0]) as model:  # enabled; each row picks its own
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            adapter_names=adapter_names(cm, domains),
        ).logits


# -- helpers ----------------------------------------------------------------------------------------
def _last_user(messages: list[dict[str, str]]) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else messages[-1]["content"]


def _strip(tokens: list[int], eos: int | None, pad: int) -> list[int]:
    """Cut a generated row at its first end-of-sequence token."""
    for i, t in enumerate(tokens):
        if t == eos or (t == pad and eos is None):
            return tokens[:i]
    return tokens
