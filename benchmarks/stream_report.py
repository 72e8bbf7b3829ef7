"""report.md of the streaming benchmark (benchmarks/stream.py) from its results."""

from __future__ import annotations

from stream_baselines import OFFLINE

COLUMNS = [
    ("precision", "P", "{:.3f}"),
    ("recall", "R", "{:.3f}"),
    ("f1", "F1", "{:.3f}"),
    ("delay_mean", "delay mean", "{:.1f}"),
    ("delay_p90", "delay p90", "{:.1f}"),
    ("false_alarms_per_10k", "false alarms /10k", "{:.1f}"),
    ("new_known_accuracy", "new-vs-known", "{:.3f}"),
    ("adapters_exact", "adapters exact", "{}"),
    ("ari_mean", "ARI", "{:.3f}"),
]


def table(rows: dict[str, dict]) -> str:
    head = "| method | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, m in rows.items():
        cells = [
            "–" if m[k] is None or (k.startswith("delay") and OFFLINE in name) else fmt.format(m[k])
            for k, _, fmt in COLUMNS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(results: dict, args) -> None:
    from crma.fileio import write_json, write_text

    write_json(args.out / "results.json", results)
    cal = results["calibration"]
    lines = [
        "# Streaming: domain-boundary detection",
        "",
        "Command: `PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream.py "
        "--loss-only && PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream.py` "
        f"({results['seconds']} s on one CPU thread, embeddings cached), then the with-training "
        "comparison: `PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python "
        f"benchmarks/stream.py --with-training {args.with_training or 'N'}`.",
        "",
        f"Embedded corpus, `spare` pools split in halves by group; up to {args.per_domain} "
        "documents per domain and half, embedded once (router layer, 128 tokens). "
        f"Thresholds from {args.val_streams} validation streams per kind (validation half); "
        f"the tables from {args.streams} evaluation streams per kind (evaluation half, other "
        "seeds). Nothing is known at the start of a stream, so each of the 5 domains should "
        "open one new domain (adapter) and be recognised on its revisit.",
        "",
        f"crma detector: confirmation threshold {cal['crma']['confirm']} (the best validation "
        f"F1 among those with at most {args.fa_margin * args.target_fa:g} false alarms per 10k "
        f"documents on the validation stationary streams, {args.fa_margin:g} of the target), "
        f"known threshold {cal['crma']['known_threshold']} (the best validation new-vs-known "
        f"accuracy), known band {cal['crma']['known_band']} (the most validation "
        "streams with exactly the right adapters, mean delay within "
        f"{args.max_delay:g}); the other settings are DetectorSettings' "
        "defaults. Baselines: each tuned "
        "value is the best validation F1 (every N documents: "
        f"N = {cal['every_n']}; router score: {cal['router_score']}; kernel CPD penalty "
        f"{cal['kernel_cpd']}). Kernel CPD is offline (it sees the whole stream): a reference "
        "for where the boundaries are, with no delay, and it names every segment a new domain.",
        "",
    ]
    titles = {
        "switching": f"Switching streams: 10 segments of {args.min_segment}–{args.max_segment} "
        f"documents, margin {args.margin}",
        "blended": f"Blended streams: neighbours mix over {args.blend} documents, margin "
        f"{args.blend_margin}",
        "stationary": f"Stationary streams: one domain, {args.stationary_docs} documents "
        "(every detection is a false alarm)",
        "switching, loss subset": f"Loss-spike baseline: switching streams from the first "
        f"{args.loss_docs} evaluation documents per domain (documents repeat within a stream); "
        "its window and k are the best F1 on these same streams (an upper bound for it)",
    }
    sw, bl, st = (results["tables"][k]["crma"] for k in ("switching", "blended", "stationary"))
    checks = [
        ("F1 ≥ 0.95 at margin 10", sw["f1"] >= 0.95, f"{sw['f1']:.3f}"),
        ("precision ≥ 0.95", sw["precision"] >= 0.95, f"{sw['precision']:.3f}"),
        ("recall ≥ 0.95", sw["recall"] >= 0.95, f"{sw['recall']:.3f}"),
        ("mean delay ≤ 10", sw["delay_mean"] <= 10, f"{sw['delay_mean']:.1f}"),
        ("delay p90 ≤ 20", sw["delay_p90"] <= 20, f"{sw['delay_p90']:.1f}"),
        (
            "≤ 1 false alarm per 10k stationary documents",
            st["false_alarms_per_10k"] <= 1,
            f"{st['false_alarms_per_10k']:.1f} ({', '.join(results['stationary_false_alarms'])})",
        ),
        (
            "new-vs-known ≥ 0.95",
            sw["new_known_accuracy"] >= 0.95,
            f"{sw['new_known_accuracy']:.3f}",
        ),
        (
            "exactly 5 adapters in ≥ 18 of 20 streams",
            sw["adapters_exact"] >= 18,
            f"{sw['adapters_exact']} of {sw['streams']} (adapters per stream: {sw['adapters']})",
        ),
        ("ARI ≥ 0.90", sw["ari_mean"] >= 0.90, f"{sw['ari_mean']:.3f}"),
        ("blended F1 ≥ 0.85 at margin 20", bl["f1"] >= 0.85, f"{bl['f1']:.3f}"),
    ]
    lines += ["## Targets (crma detector, evaluation streams)", ""]
    lines += [f"- {'met' if ok else '**missed**'}: {what}: {value}" for what, ok, value in checks]
    lines += training_check(results.get("with_training")) + [""]
    lines += ["## Validation (calibration)", "", calibration_table(cal["log"]), ""]
    for kind, rows in results["tables"].items():
        lines += [f"## {titles[kind]}", "", table(rows), ""]
        if kind in ("switching", "blended", "stationary"):
            lines += [f"![{kind}](plots/{kind}.png)", ""]
    lines += training_section(results.get("with_training"))
    write_text(args.out / "report.md", "\n".join(lines))
    print(f"wrote {args.out}/report.md")


def calibration_table(log: dict[str, list]) -> str:
    """The crma detector's validation figures for every value tried."""
    lines = [
        "| setting | value | stationary FA /10k | switching F1 | delay mean | new-vs-known "
        "| adapters exact |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("confirm", "known_threshold", "known_band"):
        for row in log[name]:
            sw = row["switching"]
            fa = f"{row['fa']:.2f}" if "fa" in row else "–"
            lines.append(
                f"| {name} | {row[name]} | {fa} | {sw['f1']:.3f} | {sw['delay_mean']:.1f} | "
                f"{sw['new_known_accuracy'] or 0:.3f} | {sw['adapters_exact']} of {sw['streams']} |"
            )
    return "\n".join(lines)


def training_check(training: dict | None) -> list[str]:
    what = "each domain's final holdout loss within 2% of the oracle-boundary run"
    if not training:
        return [f"- **not done**: {what} (run `benchmarks/stream.py --with-training N`)"]
    diffs = [d for row in training["streams"] for d in row["diff_pct"].values()]
    ok = all(abs(d) <= 2 for d in diffs)
    n = len(training["streams"])
    return [
        f"- {'met' if ok else '**missed**'}: {what}: largest |difference| "
        f"{max(map(abs, diffs)):.2f}% over {len(diffs)} domains of {n} stream(s) (of the 3 "
        "the issue asks for)"
    ]


def training_section(training: dict | None) -> list[str]:
    if not training:
        return []
    lines = [
        f"## With training: {len(training['streams'])} evaluation switching stream(s)",
        "",
        "`crma stream` (the Python API, method crma) over the stream twice: driven by the "
        "detector above, and by the true boundaries and names (oracle). Training as "
        f"configs/paper.yaml (lr 3e-3, batch 8, 64 tokens) with {training['train_steps']} steps "
        "per new domain, on its first 30 documents (StreamSettings.min_segment); then each "
        f"domain's loss on its first {training['holdout_docs']} holdout documents under the "
        "adapter the run sent most of that domain's documents to. "
        f"This command took {training['seconds']} s (a run found finished in its stack is "
        "resumed, not redone); each run's own time is below, on one CPU thread of a shared "
        "2-core machine.",
        "",
        "| stream | domain | detector's adapter | loss (detector) | loss (oracle) | difference |",
        "|---|---|---|---|---|---|",
    ]
    for row in training["streams"]:
        for d, diff in row["diff_pct"].items():
            lines.append(
                f"| {row['seed']} | {d} | {row['crma']['adapters'][d]} | "
                f"{row['crma']['loss'][d]:.4f} | {row['oracle']['loss'][d]:.4f} | {diff:+.2f}% |"
            )
    lines += [""]
    for row in training["streams"]:
        lines.append(
            f"Stream {row['seed']}: the detector's run trained {row['crma']['trained']} "
            f"({row['crma']['seconds']} s), the oracle's {row['oracle']['trained']} "
            f"({row['oracle']['seconds']} s)."
        )
    return lines + [""]
