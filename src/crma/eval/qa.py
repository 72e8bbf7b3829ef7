"""Multiple-choice QA across all domains: accuracy under oracle, routed and ablated weights.

For every domain of a stack, multiple-choice items (the corpus's continuation probes and MMLU
subject subsets, or the user's own) are scored by log-likelihood under:

- `base`: the base model alone (no adapter, CRMA backbone off);
- `oracle`: the domain's own adapters (the method's `eval_adapters`) with the backbone;
- `routed`: the adapters the router picks for each item's prompt (no task id given);
- `backbone_off`: the oracle adapters with the CRMA backbone switched off on the same weights
  (the on/off ablation; only for methods with a backbone).

Accuracy comes with Wilson 95% intervals (`crma.eval.stats`).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from crma.batching import pad, pad_id, select_rows
from crma.errors import UserError
from crma.eval.loss import sequence_nll
from crma.eval.stats import wilson_interval
from crma.fileio import write_json, write_text
from crma.routing.router import Route, Router, RouteSettings, adapter_key
from crma.settings import Settings, setting

if TYPE_CHECKING:
    from crma.continual import ContinualModel
    from crma.engine import Engine

CONDITIONS = ("base", "oracle", "routed", "backbone_off")
KINDS = ("probes", "mmlu")


@dataclass
class QASettings(Settings):
    """Which items are scored and how."""

    probes_limit: int = setting(100, "continuation probes per domain (first N)", ge=0)
    mmlu_limit: int = setting(100, "MMLU questions per domain", ge=0)
    mmlu_order: Literal["spread", "first"] = setting(
        "spread",
        "which MMLU questions: spread evenly over the domain's subjects, or the first ones in "
        "file order (its alphabetically first subject)",
    )
    batch_size: int = setting(8, "items per forward pass, each with all its options", ge=1)
    max_length: int = setting(512, "tokens per prompt + option", ge=2)


# -- items ------------------------------------------------------------------------------------------
def read_items(path: str | Path) -> list[dict[str, Any]]:
    """JSONL items: {prompt, options, answer} (continuation) or {question, choices, answer}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: probe file not found")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{n}: invalid JSON ({exc.msg})") from exc
        options = item.get("options", item.get("choices"))
        if not (("prompt" in item) ^ ("question" in item)) or not isinstance(options, list):
            raise UserError(
                f"{path}:{n}: an item needs prompt+options or question+choices, and answer"
            )
        if not isinstance(item.get("answer"), int) or not 0 <= item["answer"] < len(options):
            raise UserError(f"{path}:{n}: answer must be the index of the right option")
        items.append({"id": item.get("id", f"{path.stem}-{n}"), **item})
    return items


def spread(items: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """`n` items evenly spaced over the list (MMLU lists are grouped by subject)."""
    if n <= 0 or n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


# QA scores at most this many MMLU questions per domain in the committed configs; the others
# are split between routers (route questions) and router validation (scripts/tune_router.py).
MMLU_SCORED = 300


def unscored_questions(mmlu: list[dict[str, Any]], part: int) -> list[dict[str, Any]]:
    """The MMLU questions QA never scores (not among `spread(mmlu, MMLU_SCORED)`), every second
    one: part 0 are route questions a router may store, part 1 validates routers."""
    scored = {item["id"] for item in spread(mmlu, MMLU_SCORED)}
    return [item for item in mmlu if item["id"] not in scored][part::2]


def pick(mmlu: list[dict[str, Any]], settings: QASettings) -> list[dict[str, Any]]:
    """The `mmlu_limit` MMLU questions `mmlu_order` asks for."""
    if settings.mmlu_order == "first":
        return mmlu[: settings.mmlu_limit]
    return spread(mmlu, settings.mmlu_limit)


def corpus_items(domains: list[str], settings: QASettings) -> dict[str, dict[str, list]]:
    """Probes and MMLU items of every domain that is one of the embedded corpus's."""
    from crma.data.corpus import DOMAINS, corpus_file

    out = {}
    for d in domains:
        if d in DOMAINS:
            out[d] = {
                "probes": read_items(corpus_file(d, "probes"))[: settings.probes_limit],
                "mmlu": pick(read_items(corpus_file(d, "mmlu")), settings),
            }
    return out


def prompt_and_options(item: dict[str, Any]) -> tuple[str, list[str]]:
    """A probe scores its options as written; an MMLU question as 'Question: …\\nAnswer: X'."""
    if "prompt" in item:
        return item["prompt"], item["options"]
    return f"Question: {item['question']}\nAnswer:", [" " + c for c in item["choices"]]


# -- scoring ------------------------------------------------------------------------------------------
def score_choices(
    model, tokenizer, items: list[dict[str, Any]], batch_size: int = 8, max_length: int = 512
) -> list[int]:
    """Predicted option per item: the highest mean per-token log-likelihood given the prompt
    (the mean, not the sum, so long options are not penalised for their length)."""
    scores = option_scores(model, tokenizer, items, batch_size, max_length)
    return [int(np.argmax(s)) for s in scores]


def option_scores(
    model, tokenizer, items: list[dict[str, Any]], batch_size: int = 8, max_length: int = 512
) -> list[list[float]]:
    """Each item's options' mean per-token log-likelihood given its prompt. A prompt is cut
    from the left so that it fits `max_length` with its longest option."""
    encoded = []
    for item in items:
        prompt, options = prompt_and_options(item)
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not prompt_ids:
            raise ValueError(f"item {item.get('id')}: empty prompt, nothing to condition on")
        option_ids = [
            tokenizer(o, add_special_tokens=False)["input_ids"][: max_length - 1] for o in options
        ]
        encoded.append((prompt_ids[-(max_length - max(map(len, option_ids))) :], option_ids))
    return _mean_logprobs(model, encoded, batch_size, pad_id(tokenizer))


@torch.inference_mode()
def _mean_logprobs(model, encoded, batch_size: int, pad_value: int) -> list[list[float]]:
    """Mean log-probability of each option's tokens after its item's prompt.

    A batch of items (by prompt length) runs its prompts once, left-padded with positions
    counting each row's own tokens; then their options, by length in groups of `batch_size`,
    run on copies of the prompts' KV cache. An item's options share its prompt's keys and
    values: the prompt is computed once, not once per option, and options pad only to
    options of similar length.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    scores = [[0.0] * len(options) for _, options in encoded]
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        ids, mask = pad([encoded[i][0] for i in batch], pad_value, side="left")  # (B, P)
        prompt = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device),
            use_cache=True,
            logits_to_keep=1,
        )
        last = prompt.logits[:, -1:].float().cpu()  # (B, 1, V): predicts each first token
        rows = [(row, k) for row, i in enumerate(batch) for k in range(len(encoded[i][1]))]
        rows.sort(key=lambda rk: len(encoded[batch[rk[0]]][1][rk[1]]))
        for c in range(0, len(rows), batch_size):
            group = rows[c : c + batch_size]
            owner = [row for row, _ in group]
            options = [encoded[batch[row]][1][k] for row, k in group]
            cache = copy.deepcopy(prompt.cache)
            select_rows(cache, owner)
            opt_ids, opt_mask = pad(options, pad_value)  # (R, O)
            logits = model(
                input_ids=opt_ids.to(device),
                attention_mask=torch.cat([mask[owner], opt_mask], dim=1).to(device),
                position_ids=(mask.sum(-1)[owner, None] + torch.arange(opt_ids.shape[1])).to(
                    device
                ),
                cache=cache,
            ).logits
            # the prompt's last logits predict each option's first token
            logits = torch.cat([last[owner], logits.cpu()], dim=1)  # (R, 1 + O, V)
            labels = torch.cat([opt_ids[:, :1], opt_ids.masked_fill(opt_mask == 0, -100)], 1)
            nll = sequence_nll(logits, labels, "mean")  # (R,)
            for (row, k), mean in zip(group, nll.tolist()):
                scores[batch[row]][k] = -mean
    return scores


def predict(
    engine: Engine,
    items: list[dict[str, Any]],
    adapters: str | list[str] | None,
    backbone_on: bool,
    settings: QASettings,
    cache: dict[str, Any] | None = None,
) -> list[int]:
    """Chosen option per item with these weights; reused from `cache` when the weights match."""
    with engine.inference(adapters, backbone=backbone_on) as model:
        ids = hashlib.sha256("\n".join(str(i["id"]) for i in items).encode()).hexdigest()[:16]
        key = f"qa:{ids}:{settings.max_length}:{engine.fingerprint(adapters)}"
        if cache is not None and key in cache:
            return cache[key]
        preds = score_choices(
            model, engine.tokenizer, items, settings.batch_size, settings.max_length
        )
    if cache is not None:
        cache[key] = preds
    return preds


def tally(items: list[dict[str, Any]], preds: list[int]) -> dict[str, Any]:
    hits = "".join("1" if p == i["answer"] else "0" for i, p in zip(items, preds))
    correct = hits.count("1")
    lo, hi = wilson_interval(correct, len(items))
    return {
        "correct": correct,
        "total": len(items),
        "accuracy": correct / max(1, len(items)),
        "ci95": [lo, hi],
        "hits": hits,  # per item, for paired comparisons between methods
    }


def routed_predictions(
    cm: ContinualModel,
    items: list[dict[str, Any]],
    routes: list[Route],
    router: Router,
    oracle: tuple[Any, list[int]],
    settings: QASettings,
    cache: dict[str, Any] | None,
) -> list[int]:
    """Each item scored with the adapters its route picks; items routed to the oracle's
    adapters reuse the oracle's predictions (same weights, same answer)."""
    oracle_key, oracle_preds = oracle
    preds = list(oracle_preds)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(routes):
        groups.setdefault(adapter_key(router.adapters_for(r)), []).append(i)
    for key, rows in groups.items():
        if key == oracle_key:
            continue
        adapters = list(key) if len(key) > 1 else (key[0] if key else None)
        sub = predict(cm.engine, [items[i] for i in rows], adapters, True, settings, cache)
        for i, p in zip(rows, sub):
            preds[i] = p
    return preds


def evaluate_qa(
    cm: ContinualModel,
    items: dict[str, dict[str, list[dict[str, Any]]]],
    route: RouteSettings | None = None,
    settings: QASettings | None = None,
    cache: dict[str, Any] | None = None,
    on_domain_done: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Accuracy per condition, domain and item kind: {conditions, results[c][d][kind], routes}.

    `on_domain_done(domain)` runs after each domain (e.g. to save `cache`, so a killed run
    resumes, and to report progress).
    """
    s = settings or QASettings()
    method = cm.method
    conditions = ["base", "oracle"]
    if method.needs_task_id:
        conditions.append("routed")
    if cm.engine.backbone is not None:
        conditions.append("backbone_off")
    router = Router(cm, route) if "routed" in conditions else None
    results: dict[str, Any] = {c: {} for c in conditions}
    route_hits: dict[str, dict[str, Any]] = {}
    for domain, kinds in items.items():
        adapters = method.eval_adapters(domain)
        for c in conditions:
            results[c].setdefault(domain, {})
        for kind, its in kinds.items():
            if not its:
                continue
            oracle = predict(cm.engine, its, adapters, True, s, cache)
            results["base"][domain][kind] = tally(
                its, predict(cm.engine, its, None, False, s, cache)
            )
            results["oracle"][domain][kind] = tally(its, oracle)
            if "backbone_off" in conditions:
                off = predict(cm.engine, its, adapters, False, s, cache)
                results["backbone_off"][domain][kind] = tally(its, off)
            if router is not None:
                routes = router.route_texts([prompt_and_options(i)[0] for i in its])
                preds = routed_predictions(
                    cm, its, routes, router, (adapter_key(adapters), oracle), s, cache
                )
                results["routed"][domain][kind] = tally(its, preds)
                route_hits.setdefault(domain, {})[kind] = {
                    "to_own_domain": sum(r.domain == domain for r in routes) / len(routes),
                    "fallback": sum(r.domain is None for r in routes) / len(routes),
                }
        if on_domain_done is not None:
            on_domain_done(domain)
    return {
        "method": method.name,
        "domains": list(items),
        "conditions": conditions,
        "router": (route or RouteSettings()).router if router else None,
        "results": results,
        "routing_of_items": route_hits,
    }


def evaluate_base(
    engine: Engine,
    items: dict[str, dict[str, list[dict[str, Any]]]],
    settings: QASettings | None = None,
    on_domain_done: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The `base` condition alone (no adapter, no backbone), for a model without a stack: what
    the untrained base already knows, against which every trained model is read."""
    s = settings or QASettings()
    results: dict[str, Any] = {"base": {}}
    for domain, kinds in items.items():
        results["base"][domain] = {
            kind: tally(its, predict(engine, its, None, False, s))
            for kind, its in kinds.items()
            if its
        }
        if on_domain_done is not None:
            on_domain_done(domain)
    return {
        "method": "base",
        "domains": list(items),
        "conditions": ["base"],
        "router": None,
        "results": results,
        "routing_of_items": {},
    }


def markdown_table(result: dict[str, Any]) -> str:
    """Rows: conditions; columns: domain × item kind; cells: accuracy % [Wilson 95%]."""
    scored = result["results"].get("oracle") or result["results"][result["conditions"][0]]
    cols = [(d, k) for d in result["domains"] for k in KINDS if k in scored.get(d, {})]
    head = "| condition | " + " | ".join(f"{d} {k}" for d, k in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for c in result["conditions"]:
        cells = []
        for d, k in cols:
            t = result["results"][c][d].get(k)
            cells.append("–" if t is None else _cell(t))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(t: dict[str, Any]) -> str:
    lo, hi = t["ci95"]
    return f"{100 * t['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def write_eval(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """qa.json and qa.md in `out_dir`."""
    out_dir = Path(out_dir)
    write_json(out_dir / "qa.json", result)
    text = (
        f"# QA accuracy (%) with Wilson 95% intervals — method {result['method']}\n\n"
        "Items scored by mean per-token log-likelihood of each option (chance 25%).\n"
        "base: no adapter, backbone off; oracle: the domain's adapters; routed: the router's "
        "choice; backbone_off: oracle adapters with the CRMA backbone switched off.\n\n"
        + markdown_table(result)
        + "\n"
    )
    write_text(out_dir / "qa.md", text)
    return out_dir / "qa.json", out_dir / "qa.md"
