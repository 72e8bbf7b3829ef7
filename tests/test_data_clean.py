"""The dataset optimizer and the contamination check, on planted duplicates and leaks."""

from __future__ import annotations

import json
from pathlib import Path

from crma.cli import main
from crma.data.clean import (
    CleanConfig,
    ContainmentIndex,
    clean_records,
    find_contamination,
    normalize_text,
    word_ngrams,
)
from crma.eval.qa import score_choices
from crma.eval.stats import wilson_interval

# Distinct passages about different things: no two are near duplicates.
PASSAGES = [
    "The heart is a muscular organ that pumps blood through the blood vessels of the body, "
    "delivering oxygen and nutrients to the tissues and carrying away carbon dioxide.",
    "A software licence grants the recipient rights to use, copy and modify a program, "
    "usually on condition that the copyright notice is kept with every copy distributed.",
    "Bond prices move inversely to interest rates: when the central bank raises its policy "
    "rate, newly issued bonds pay more, so existing bonds with lower coupons lose value.",
    "In a closed system energy is conserved; it changes form between kinetic and potential "
    "energy, heat and work, but the total amount stays the same over time.",
    "The derivative of a function measures how its output changes as its input changes, and "
    "geometrically it is the slope of the tangent line to the graph at a point.",
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def near_copy(text: str) -> str:
    """The same passage with one word changed: what a repeated disclaimer looks like."""
    return text.replace("delivering", "bringing", 1)


def test_normalize_text_fixes_unicode_and_whitespace_but_keeps_indentation():
    raw = "\ufeffCafe\u0301\u00a0bar\u200b  \r\n\r\n\r\n\r\n    return x\t \r\n\n"
    assert normalize_text(raw) == "Café bar\n\n    return x"


def test_clean_removes_planted_duplicates_and_keeps_distinct_rows():
    rows = [{"text": t} for t in PASSAGES]
    rows.append(
        {"text": "  " + PASSAGES[0].upper().replace(" ", "   ") + "  "}
    )  # exact, modulo case
    rows.append({"text": near_copy(PASSAGES[0])})  # near duplicate
    kept, report = clean_records(rows, CleanConfig(), where=lambda i: i + 1)
    assert [r["text"] for r in kept] == PASSAGES
    assert report["removed"] == {"exact_duplicate": 1, "near_duplicate": 1}
    [exact] = report["examples"]["exact_duplicate"]
    [near] = report["examples"]["near_duplicate"]
    assert (exact["row"], exact["duplicate_of"]) == (6, 1)
    assert (near["row"], near["duplicate_of"]) == (7, 1)
    assert 0.7 <= near["similarity"] < 1.0


def test_clean_filters_short_long_non_text_and_other_languages():
    rows = [
        {"text": PASSAGES[0]},
        {"text": "Too short."},
        {"text": "word " * 100},
        {"text": "3.14 2.71 1.41 | 0x1F 0x2A -- 42 % 17 = 8 ; 99 >> 2 " * 2},
        {"text": "Der Vertrag wird auf unbestimmte Zeit geschlossen und kann von beiden "
                 "Parteien mit einer Frist von drei Monaten gekündigt werden."},
    ]  # fmt: skip
    cfg = CleanConfig(min_chars=40, max_chars=400, language="en")
    kept, report = clean_records(rows, cfg)
    assert [r["text"] for r in kept] == [PASSAGES[0]]
    assert report["removed"] == {"language": 1, "mostly_non_text": 1, "too_long": 1, "too_short": 1}


def test_clean_command_writes_rows_and_report(tmp_path, capsys):
    rows = [{"prompt": "Q: ", "completion": t} for t in PASSAGES] + [
        {"prompt": "Q: ", "completion": near_copy(PASSAGES[0])}
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    assert main(["data", "clean", str(src), "--out", str(out), "--report", str(report)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows[:-1]
    written = json.loads(report.read_text())
    assert written["rows_in"] == 6 and written["rows_kept"] == 5
    assert written["examples"]["near_duplicate"][0]["row"] == 6
    assert "kept 5 of 6 rows" in capsys.readouterr().out


def test_near_dup_threshold_option_changes_what_counts():
    rows = [{"text": PASSAGES[0]}, {"text": near_copy(PASSAGES[0])}]
    kept, _ = clean_records(rows, CleanConfig(near_dup_threshold=0.95))
    assert len(kept) == 2


def test_contamination_flags_planted_leaks_within_and_across_domains():
    train = [("medical", PASSAGES[0]), ("legal", PASSAGES[1]), ("financial", PASSAGES[2])]
    holdout = [
        ("science", PASSAGES[3]),  # clean
        ("medical", near_copy(PASSAGES[0])),  # near, same domain
        ("science", PASSAGES[2]),  # exact, from another domain
    ]
    leaks = find_contamination(train, holdout, CleanConfig())
    summary = [(x["holdout_row"], x["train_row"], x["kind"], x["scope"]) for x in leaks]
    assert summary == [(1, 0, "near", "within_domain"), (2, 2, "exact", "cross_domain")]


def test_containment_is_the_share_of_ngrams_in_one_row_and_in_all():
    train = ["a b c d e", "c d e f g", "x y z"]
    index = ContainmentIndex(train, n=2)
    # holdout bigrams: ab bc cd de ef fg gh -> row 0 holds ab bc cd de (4/7), row 1 holds
    # cd de ef fg (4/7, the tie goes to the lower row), all rows together 6/7
    row, one, every = index.containment("a b c d e f g h")
    assert (row, one, every) == (0, 4 / 7, 6 / 7)
    assert index.containment("p q r") == (None, 0.0, 0.0)
    assert word_ngrams("Two words", 8) == {"two words"}  # shorter than n: one gram


def test_containment_flags_templated_rows_that_jaccard_misses():
    template = (
        "deposits along the epidermal basement membrane zone as seen by direct "
        "immunofluorescence of a skin biopsy taken from the edge of a fresh blister"
    )
    train = [("medical", f"Linear IgA {template}, often with itching and a burning feeling.")]
    holdout = [("medical", f"Linear C3 {template}.")]
    assert find_contamination(train, holdout, CleanConfig(containment_threshold=1.0)) == []
    (leak,) = find_contamination(train, holdout, CleanConfig())
    assert leak["kind"] == "contained" and leak["similarity"] < 0.7
    assert leak["containment"] >= 0.5 and leak["containment_all"] == leak["containment"]


def test_check_command_exits_1_above_threshold(tmp_path, capsys):
    train = write_jsonl(tmp_path / "med.train.jsonl", [{"text": t} for t in PASSAGES[:3]])
    holdout = write_jsonl(
        tmp_path / "med.holdout.jsonl",
        [{"text": PASSAGES[3]}, {"text": PASSAGES[4]}, {"text": near_copy(PASSAGES[0])}],
    )
    report = tmp_path / "leaks.json"
    args = ["data", "check", str(train), str(holdout), "--report", str(report)]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "3 holdout rows, 1 contaminated" in out and "1 within a domain" in out
    assert f"{holdout}:3 ~ {train}:1" in out
    assert json.loads(report.read_text())["leaks"][0]["holdout_row"] == f"{holdout}:3"
    assert main([*args, "--threshold", "0.5"]) == 0


# -- multiple-choice scoring --------------------------------------------------------------------
class CharTokenizer:
    """One token per character: enough to drive `score_choices` without a real model."""

    pad_token_id, eos_token_id = 0, 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) % 128 for c in text]}


class FixedNextToken:
    """A 'model' whose next-token distribution ignores the context: p(X)=.5, p(Y)=.25."""

    def __init__(self):
        import torch

        logp = torch.full((128,), -20.0)
        logp[ord("X")], logp[ord("Y")] = torch.log(torch.tensor(0.5)), torch.log(torch.tensor(0.25))
        self.logp, self.weight = logp, torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self.weight])

    def __call__(self, input_ids, attention_mask, **kwargs):
        from types import SimpleNamespace

        from transformers import DynamicCache

        logits = self.logp.expand(*input_ids.shape, 128).clone()
        return SimpleNamespace(logits=logits, cache=DynamicCache())


def test_score_choices_uses_mean_option_log_likelihood():
    items = [
        {"prompt": "YYYY", "options": ["Y", "XXXX", "qq", "Xq"], "answer": 1},  # mean beats sum
        {"question": "Which?", "choices": ["q", "Y", "X", "z"], "answer": 2},  # MMLU layout
    ]
    assert score_choices(FixedNextToken(), CharTokenizer(), items, batch_size=3) == [1, 2]


def test_wilson_interval():
    low, high = wilson_interval(50, 100)
    assert round(low, 3) == 0.404 and round(high, 3) == 0.596
    assert wilson_interval(0, 10)[0] == 0.0
