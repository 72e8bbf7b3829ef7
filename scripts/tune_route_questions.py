"""Choose `eval.route_questions`: how many MMLU questions per domain the stored routers keep.

    .venv/bin/python scripts/tune_route_questions.py [--counts 0,25,50,100,250]

A domain's training passages can look nothing like the questions its users ask: on validation
the stored router sends 5 % of code's MMLU questions to code (results/tuning/router.md). Route
examples are prompts of the users' kind stored beside the passages (`crma train
--route-examples`); in the protocol, each corpus domain's MMLU questions that QA never scores,
split in two (`crma.eval.qa.unscored_questions`): part 0 may be stored, part 1 validates.

For the main router and the serving router chosen by scripts/tune_router.py (their settings
read from results/tuning/router.json and router-serving.json), and each count N, the routers
are built as a stack builds them (the first 500 training texts, plus the first N of part 0)
and scored by top-1 on the validation sets of tune_router.py: `passages`, `prompts`, and
`questions` (part 1 only here). Code has 56 questions in part 0, so it stores at most 56.

Rule (fixed after an exploratory look at N = 0, 25, 50 and 250 on these validation sets, before
any evaluation set was routed with route questions): among the counts whose main router keeps every domain's
`passages` at 99 % or more, the highest mean `questions` top-1 over the domains, counts within
1 point of it counting as equal; then the smaller count. Writes
results/tuning/router-route-questions.md and .json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tune_router import PASSAGES, hidden_sums, pooled, top1_per_domain, validation_sets

SETS = ("passages", "prompts", "questions")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", default="0,25,50,100,250", help="route questions per domain")
    parser.add_argument("--validation", type=int, default=560, help="as tune_router.py")
    parser.add_argument("--cache", default="runs/tuning/router-cache", help="embedding cache")
    parser.add_argument("--tuned", default="results/tuning/router", help="tune_router.py's stem")
    parser.add_argument("--out", default="results/tuning/router-route-questions")
    args = parser.parse_args()
    counts = sorted({int(n) for n in args.counts.split(",")})

    from crma.data import DOMAINS
    from crma.data.corpus import corpus_tag
    from crma.fileio import write_json, write_text
    from crma.routing.index import CentroidSettings

    tuned = Path(args.tuned)
    routers = {
        "main": CentroidSettings(**load_selected(tuned.with_suffix(".json"))),
        "serving": CentroidSettings(**load_selected(tuned.with_name(tuned.name + "-serving.json"))),
    }
    layers = sorted({s.layer for s in routers.values()})
    folder = (
        Path(args.cache) / f"{corpus_tag()}-{args.validation}-layers-{'-'.join(map(str, layers))}"
    )
    cache = embedded_sets(folder, layers, args.validation, DOMAINS)

    trials = []
    for n in counts:
        for name, settings in routers.items():
            router = build(settings, cache, DOMAINS, n)
            top1 = {s: top1_per_domain(router, cache, s, DOMAINS, settings) for s in SETS}
            trials.append({"router": name, "count": n, "top1": top1})
            print(
                f"{name:<7} N={n:<4} "
                + " | ".join(
                    f"{s} " + " ".join(f"{100 * v:5.1f}" for v in top1[s].values()) for s in SETS
                ),
                flush=True,
            )
    chosen = select([t for t in trials if t["router"] == "main"])
    out = Path(args.out)
    write_json(out.with_suffix(".json"), {"args": vars(args), "trials": trials, "chosen": chosen})
    write_text(out.with_suffix(".md"), markdown(trials, chosen, DOMAINS, routers))
    print(f"chosen: eval.route_questions={chosen} -> {out.with_suffix('.md')}")


def load_selected(path: Path) -> dict:
    return json.loads(path.read_text())["selected"]["settings"]


def embedded_sets(folder: Path, layers: list[int], validation: int, domains: list[str]) -> dict:
    """Hidden-state sums per (set, domain): training texts, validation passages and prompts,
    and the unscored questions' two parts ("route": part 0, "questions": part 1)."""
    from crma.data import corpus_file
    from crma.engine import Engine, LoraSettings
    from crma.eval.qa import read_items, unscored_questions
    from crma.model import EMBEDDED, load_base
    from crma.routing.index import CentroidSettings

    max_length, engine = CentroidSettings().max_length, None
    cache = {}
    for d in domains:
        path = {
            name: folder / f"{name}-{d}.pt"
            for name in ("train", "passages", "prompts", "route", "questions")
        }
        if not all(p.is_file() for p in path.values()):
            if engine is None:
                engine = Engine(*load_base(EMBEDDED), LoraSettings(), None)
            mmlu = read_items(corpus_file(d, "mmlu"))
            parts = {"route": unscored_questions(mmlu, 0), "questions": unscored_questions(mmlu, 1)}
            texts = validation_sets(d, engine.tokenizer, validation, parts)
            for name, ids in texts.items():
                if not path[name].is_file():
                    path[name].parent.mkdir(parents=True, exist_ok=True)
                    torch.save(hidden_sums(engine, ids, layers, max_length, []), path[name])
                    print(f"embedded {name} {d}: {len(ids)} texts", flush=True)
        for name, p in path.items():
            cache[name, d] = torch.load(p)
    return cache


def build(settings, cache: dict, domains: list[str], count: int):
    """The router a stack stores with `settings` and `count` route questions per domain (the
    training texts' rows first, as `CentroidRouter.add_examples`)."""
    from crma.routing.index import CentroidRouter

    assert not settings.prefixes, "prefixes are not part of this comparison"
    router = CentroidRouter(settings)
    for d in domains:
        rows = pooled(cache["train", d], settings.layer, settings.skip_first)
        route = pooled(cache["route", d], settings.layer, settings.skip_first)[:count]
        router.add(d, torch.cat([rows, route]))
    return router


def mean(trial: dict, name: str) -> float:
    return sum(trial["top1"][name].values()) / len(trial["top1"][name])


def select(trials: list[dict]) -> int:
    """The count the rule in the module docstring picks."""
    ok = [t for t in trials if min(t["top1"]["passages"].values()) >= PASSAGES] or trials[:1]
    best = max(mean(t, "questions") for t in ok)
    return min(t["count"] for t in ok if mean(t, "questions") >= best - 0.01)


def markdown(trials: list[dict], chosen: int, domains: list[str], routers: dict) -> str:
    lines = [
        "# Route questions: how many MMLU questions per domain the stored routers keep",
        "",
        "`scripts/tune_route_questions.py` (sets and rule in its docstring). Top-1 (%) per "
        "domain on the validation sets; `questions` are the unscored MMLU questions no router "
        "stores (part 1). Routers: "
        + "; ".join(
            f"{name}: hidden state {s.layer}, L2 {s.l2:g}, skip first {s.skip_first}"
            for name, s in routers.items()
        )
        + ".",
        "",
        "| router | N | set | " + " | ".join(domains) + " | worst | mean |",
        "|---" * (len(domains) + 5) + "|",
    ]
    for t in trials:
        for s in SETS:
            v = [100 * t["top1"][s][d] for d in domains]
            mark = " **(chosen)**" if t["router"] == "main" and t["count"] == chosen else ""
            lines.append(
                f"| {t['router']} | {t['count']}{mark} | {s} | "
                + " | ".join(f"{x:.1f}" for x in v)
                + f" | {min(v):.1f} | {sum(v) / len(v):.1f} |"
            )
    lines += ["", f"Chosen: `eval.route_questions: {chosen}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
