"""The dataset optimizer: normalise, filter, deduplicate, and check holdouts for contamination.

A holdout row that is a near copy of a training row makes forgetting look smaller than it is,
so exact and near duplicates are removed (MinHash + LSH from `datasketch`, with a fixed seed so
the same input always keeps the same rows) and `find_contamination` reports what is left. The
corpus builder runs exactly this code, so its own check is the one users run.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from datasketch import MinHash, MinHashLSH
from tqdm import tqdm

from crma.data.formats import record_kind, record_text
from crma.settings import SettingError, Settings, setting

WORD = re.compile(r"\w+")
ODD_SPACE = re.compile(r"[^\S\n\t]")  # every whitespace but newline and tab, e.g. NBSP
INVISIBLE = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
# The most frequent English words: a cheap, dependency-free test for English prose.
COMMON_ENGLISH = (
    "the of and to a in is that for it as was with be by on not he i this are or his from at "
    "which but have an they you were her she there one all we can their has been if more when "
    "will would who so no its into than them these may any other such"
)
ENGLISH_WORDS = frozenset(COMMON_ENGLISH.split())
EXAMPLES_PER_REASON = 3


@dataclass
class CleanConfig(Settings):
    """Dataset cleaning: length and text filters, exact and near-duplicate removal."""

    min_chars: int = setting(20, "drop rows shorter than this many characters", ge=0)
    max_chars: int = setting(100_000, "drop rows longer than this many characters", ge=1)
    min_alpha: float = setting(
        0.4, "drop rows whose share of letters among non-space chars is lower", ge=0, le=1
    )
    language: Literal["en"] | None = setting(None, "keep only rows in this language")
    min_language_share: float = setting(
        0.15, "with --language en: least share of common English words", ge=0, le=1
    )
    near_dup_threshold: float = setting(
        0.7, "Jaccard similarity (word 3-grams) that counts as a near duplicate", gt=0, le=1
    )
    num_perm: int = setting(128, "MinHash permutations (more = more exact, slower)", ge=2)
    seed: int = setting(1, "MinHash seed; fixed so the same rows are kept on every run", ge=0)
    containment_ngram: int = setting(8, "word n-gram length of the containment measure", ge=1)
    containment_threshold: float = setting(
        0.5,
        "share of a holdout row's word n-grams found in one training row (or in all of them "
        "together) that counts as contamination: catches templated near-duplicates",
        gt=0,
        le=1,
    )

    def check_together(self) -> None:
        if self.min_chars > self.max_chars:
            raise SettingError("min_chars", self.min_chars, f"at most max_chars ({self.max_chars})")


@dataclass
class CheckSettings(Settings):
    """Contamination check of holdout rows against training rows."""

    threshold: float = setting(
        0.0, "largest share of contaminated holdout rows that passes", ge=0, le=1
    )
    near_dup_threshold: float = setting(
        0.7, "Jaccard similarity that counts as a near duplicate (as in `data clean`)", gt=0, le=1
    )
    containment_threshold: float = setting(
        0.5, "share of a holdout row's word n-grams in training rows that counts", gt=0, le=1
    )
    ngram: int = setting(8, "word n-gram length of the containment measure", ge=1)


# -- per-row steps ------------------------------------------------------------------------------
def normalize_text(text: str) -> str:
    """NFC Unicode, plain newlines and spaces, no invisible characters, no trailing spaces, at
    most one blank line in a row. Leading indentation is kept: code needs it."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = ODD_SPACE.sub(" ", INVISIBLE.sub("", text))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def normalize_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record with `normalize_text` applied to each of its text fields."""
    kind = record_kind(record)
    out = dict(record)
    if kind == "messages":
        out["messages"] = [{**m, "content": normalize_text(m["content"])} for m in out["messages"]]
        return out
    if kind == "prompt":
        # The text is learned as prompt + completion: the space at the seam is part of it.
        out["prompt"] = _normalize_inside(out["prompt"])
        out["completion"] = _normalize_inside(out["completion"])
        return out
    for field in ["text"] if kind == "text" else ["instruction", "input", "output"]:
        if isinstance(out.get(field), str):
            out[field] = normalize_text(out[field])
    return out


def _normalize_inside(text: str) -> str:
    """`normalize_text`, but leading and trailing whitespace are kept (as plain spaces)."""
    lead, body, trail = re.fullmatch(r"(\s*)(.*?)(\s*)", text, re.DOTALL).groups()
    return _plain_whitespace(lead) + normalize_text(body) + _plain_whitespace(trail)


def _plain_whitespace(space: str) -> str:
    return ODD_SPACE.sub(" ", space.replace("\r\n", "\n").replace("\r", "\n"))


def alpha_share(text: str) -> float:
    visible = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in visible) / len(visible) if visible else 0.0


def english_share(text: str) -> float:
    words = WORD.findall(text.lower())
    return sum(w in ENGLISH_WORDS for w in words) / len(words) if words else 0.0


def filter_reason(text: str, cfg: CleanConfig) -> str | None:
    """Why a (normalised) row is dropped before deduplication, or None to keep it."""
    if not text.strip():
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    if alpha_share(text) < cfg.min_alpha:
        return "mostly_non_text"
    if cfg.language == "en" and english_share(text) < cfg.min_language_share:
        return "language"
    return None


def exact_key(text: str) -> str:
    """Equal for texts differing only in case and whitespace."""
    return hashlib.sha256(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


def shingles(text: str, n: int = 3) -> list[bytes]:
    words = WORD.findall(text.lower())
    grams = {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}
    return sorted(g.encode("utf-8") for g in grams)


def minhashes(texts: Sequence[str], cfg: CleanConfig, desc: str = "minhash") -> list[MinHash]:
    batches = (shingles(t) for t in tqdm(texts, desc=desc, unit="row", disable=None))
    return MinHash.bulk(batches, num_perm=cfg.num_perm, seed=cfg.seed)


class NearDuplicateIndex:
    """LSH over MinHashes; a hit is confirmed by the MinHash Jaccard estimate.

    Whether two rows are candidates depends on the pair alone, so a dedupe and a later check
    with the same settings agree exactly: nothing the dedupe kept can be flagged by the check.
    """

    def __init__(self, cfg: CleanConfig):
        self.threshold = cfg.near_dup_threshold
        self.lsh = MinHashLSH(threshold=cfg.near_dup_threshold, num_perm=cfg.num_perm)
        self.hashes: dict[int, MinHash] = {}

    def add(self, key: int, mh: MinHash) -> None:
        self.lsh.insert(key, mh)
        self.hashes[key] = mh

    def best_match(self, mh: MinHash) -> tuple[int, float] | None:
        """(key, similarity) of the most similar indexed row at or above the threshold."""
        scored = [(mh.jaccard(self.hashes[k]), -k) for k in self.lsh.query(mh)]
        scored = [s for s in scored if s[0] >= self.threshold]
        if not scored:
            return None
        sim, neg_key = max(scored)
        return -neg_key, sim


# -- whole-dataset cleaning ---------------------------------------------------------------------
@dataclass
class Removal:
    index: int
    reason: str
    duplicate_of: int | None = None
    similarity: float | None = None


def clean_texts(
    texts: Sequence[str], cfg: CleanConfig, desc: str = "dedupe"
) -> tuple[list[int], list[Removal]]:
    """Indices of the rows to keep (first of each duplicate set, in input order) and why each
    other row goes. Texts are expected normalised already."""
    removals, candidates = [], []
    for i, text in enumerate(texts):
        reason = filter_reason(text, cfg)
        if reason:
            removals.append(Removal(i, reason))
        else:
            candidates.append(i)
    first_by_key: dict[str, int] = {}
    unique = []
    for i in candidates:
        first = first_by_key.setdefault(exact_key(texts[i]), i)
        if first == i:
            unique.append(i)
        else:
            removals.append(Removal(i, "exact_duplicate", first, 1.0))
    index = NearDuplicateIndex(cfg)
    kept = []
    for i, mh in zip(unique, minhashes([texts[i] for i in unique], cfg, desc)):
        match = index.best_match(mh)
        if match:
            removals.append(Removal(i, "near_duplicate", *match))
        else:
            index.add(i, mh)
            kept.append(i)
    return kept, sorted(removals, key=lambda r: r.index)


def removal_report(
    texts: Sequence[str], kept: list[int], removals: list[Removal], cfg: CleanConfig, where=None
) -> dict[str, Any]:
    """Counts per reason and a few examples of each; `where(i)` names row i (e.g. its line)."""
    where = where or (lambda i: i)
    examples: dict[str, list[dict[str, Any]]] = {}
    for r in removals:
        bucket = examples.setdefault(r.reason, [])
        if len(bucket) < EXAMPLES_PER_REASON:
            example = {"row": where(r.index), "text": _preview(texts[r.index])}
            if r.duplicate_of is not None:
                example |= {"duplicate_of": where(r.duplicate_of), "similarity": r.similarity}
                example["duplicate_text"] = _preview(texts[r.duplicate_of])
            bucket.append(example)
    return {
        "rows_in": len(texts),
        "rows_kept": len(kept),
        "removed": dict(sorted(Counter(r.reason for r in removals).items())),
        "examples": examples,
        "config": asdict(cfg),
    }


def _preview(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def clean_records(
    records: list[dict[str, Any]], cfg: CleanConfig, where=None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Normalised records that survive the filters and dedupe, plus the removal report."""
    records = [normalize_record(r) for r in records]
    texts = [record_text(r) for r in records]
    kept, removals = clean_texts(texts, cfg)
    return [records[i] for i in kept], removal_report(texts, kept, removals, cfg, where)


# -- contamination ------------------------------------------------------------------------------
def word_ngrams(text: str, n: int) -> set[str]:
    """The distinct word n-grams of a text (a text of fewer than n words is one gram)."""
    words = WORD.findall(text.lower())
    return {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


class ContainmentIndex:
    """Which training rows hold a holdout row's word n-grams.

    Jaccard misses templated near-duplicates ("Linear C3 deposits…" vs "Linear IgA
    deposits…", one licence clause inside a longer one): their sets differ in size or wording
    around a shared core. Containment asks what share of the holdout row's n-grams a training
    row holds (`one`), and what share all training rows hold together (`all`).
    """

    def __init__(self, texts: Sequence[str], n: int):
        self.n = n
        self.rows: dict[str, list[int]] = {}
        for j, text in enumerate(texts):
            for gram in word_ngrams(text, n):
                self.rows.setdefault(gram, []).append(j)

    def containment(self, text: str) -> tuple[int | None, float, float]:
        """(training row holding the largest share, that share, share held by all rows)."""
        grams = word_ngrams(text, self.n)
        counts: Counter[int] = Counter()
        found = 0
        for gram in grams:
            if rows := self.rows.get(gram):
                found += 1
                counts.update(rows)
        if not counts:
            return None, 0.0, 0.0
        row, shared = min(counts.items(), key=lambda item: (-item[1], item[0]))
        return row, shared / len(grams), found / len(grams)


def find_contamination(
    train: Sequence[tuple[str, str]], holdout: Sequence[tuple[str, str]], cfg: CleanConfig
) -> list[dict[str, Any]]:
    """Holdout rows that duplicate a training row exactly or nearly, or whose word n-grams
    are contained in the training rows above `cfg.containment_threshold`.

    Rows are (domain, text). Each leak names the holdout and training row indices, their
    domains, whether it is within or across domains, the Jaccard similarity to that row (the
    MinHash estimate) and the containment in it and in all training rows.
    """
    train_texts = [normalize_text(t) for _, t in train]
    hold_texts = [normalize_text(t) for _, t in holdout]
    exact = {}
    for j, text in enumerate(train_texts):
        exact.setdefault(exact_key(text), j)
    index = NearDuplicateIndex(cfg)
    train_hashes = minhashes(train_texts, cfg, "minhash train")
    for j, mh in enumerate(train_hashes):
        index.add(j, mh)
    contained = ContainmentIndex(train_texts, cfg.containment_ngram)
    leaks = []
    for i, mh in enumerate(minhashes(hold_texts, cfg, "minhash holdout")):
        row, one, every = contained.containment(hold_texts[i])
        j = exact.get(exact_key(hold_texts[i]))
        if j is not None:
            match, kind = (j, 1.0), "exact"
        elif match := index.best_match(mh):
            kind = "near"
        elif row is not None and max(one, every) >= cfg.containment_threshold:
            match, kind = (row, mh.jaccard(train_hashes[row])), "contained"
        if match:
            j, similarity = match
            leaks.append(
                {
                    "holdout_row": i,
                    "train_row": j,
                    "kind": kind,
                    "scope": "within_domain" if holdout[i][0] == train[j][0] else "cross_domain",
                    "holdout_domain": holdout[i][0],
                    "train_domain": train[j][0],
                    "similarity": round(similarity, 4),
                    "containment": round(one, 4),
                    "containment_all": round(every, 4),
                    "text": _preview(hold_texts[i]),
                }
            )
    return leaks
