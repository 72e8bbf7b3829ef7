"""The embedded corpus, built for real from the installed data packages (about 30 s a build)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crma.cli import main
from crma.data import DOMAINS, corpus_file, ensure_corpus, load_records, tokenize_records
from crma.data import corpus as corpus_module
from crma.data.clean import find_contamination
from crma.data.corpus import CORPUS_CLEAN, N_PROBES, SPLITS, build_corpus, group_split
from crma.data.qa import MMLU_SUBJECTS, make_probes
from crma.errors import UserError


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("corpus") / "built"
    return root, build_corpus(root)


def rows(root: Path, domain: str, split: str) -> list[dict]:
    return [json.loads(line) for line in corpus_file(domain, split, root).read_text().splitlines()]


def test_documented_counts_and_manifest(built):
    root, manifest = built
    for domain in DOMAINS:
        counts = manifest["counts"][domain]
        assert counts["train"] == 500 and counts["holdout"] == 100 and counts["probes"] == 300
        assert counts["spare"] == counts["kept"] - 600 > 0
        assert counts["mmlu"] >= 400
        for split in SPLITS:
            assert len(rows(root, domain, split)) == counts[split]
        for source in manifest["sources"][domain]:
            assert source["version"] and len(source["sha256"]) == 64
    assert manifest["counts"]["legal"]["removed"]["near_duplicate"] > 0  # repeated disclaimers


def test_rows_are_passages_the_loader_accepts(built, tokenizer):
    root, _ = built
    ids = []
    for domain in DOMAINS:
        for split in ("train", "holdout", "spare"):
            for row in rows(root, domain, split):
                assert set(row) == {"id", "domain", "source", "text"} and row["domain"] == domain
                assert 200 <= len(row["text"]) <= 2000
                ids.append(row["id"])
    assert len(ids) == len(set(ids))
    records = load_records(corpus_file("code", "train", root))
    examples = tokenize_records(records[:3], tokenizer, 32)
    assert [len(e["input_ids"]) for e in examples] == [32, 32, 32]


@pytest.mark.integration
def test_two_builds_are_byte_identical(built, tmp_path):
    root, _ = built
    again = tmp_path / "again"
    env = {**os.environ, "PYTHONHASHSEED": "7"}  # the first build ran under another seed
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "crma"), "data", "build", "--out", str(again)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(line.split()[:3] == ["medical", "500", "100"] for line in proc.stdout.splitlines())
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (root / name).read_bytes() == (again / name).read_bytes(), name


@pytest.mark.parametrize(
    ("domain", "parent"),
    [("legal", lambda source: source.split("#")[0]), ("code", lambda s: s.split(":")[0])],
)
def test_group_split_keeps_each_parent_on_one_side(built, domain, parent):
    root, _ = built
    parents = {s: {parent(r["source"]) for r in rows(root, domain, s)} for s in SPLITS[:3]}
    assert len(parents["holdout"]) >= 20  # no parent holds more than 5 of 100
    assert not parents["train"] & parents["holdout"]
    assert not parents["spare"] & (parents["train"] | parents["holdout"])


def test_no_train_holdout_near_duplicates_by_its_own_check(built, capsys):
    root, _ = built
    assert main(["data", "check", str(root)]) == 0
    assert "500 holdout rows, 0 contaminated" in capsys.readouterr().out
    spare = [(r["domain"], r["text"]) for d in DOMAINS for r in rows(root, d, "spare")[:300]]
    train = [(r["domain"], r["text"]) for d in DOMAINS for r in rows(root, d, "train")]
    # spare is deduplicated against train, not containment-filtered: it takes the holdout's
    # templated leaks (test_group_split_moves_contained_holdout_groups_to_spare)
    leaks = find_contamination(train, spare, CORPUS_CLEAN)
    assert [x for x in leaks if x["kind"] != "contained"] == []


def test_group_split_moves_contained_holdout_groups_to_spare(monkeypatch):
    """Families of templated passages (one shared 12-word core, three words of their own) in
    groups of one: a holdout group whose sibling went to train must move to spare."""
    monkeypatch.setattr(corpus_module, "SPLIT_SIZES", {"holdout": 4, "train": 8})
    monkeypatch.setattr(corpus_module, "MAX_GROUP_SHARE", 4)
    core = [" ".join(f"w{f}x{i}" for i in range(12)) for f in range(6)]
    texts = [f"{core[f]} own{f}a{k} own{f}b{k} own{f}c{k}" for f in range(6) for k in range(5)]
    rows = [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)]
    index_of = {r["id"]: i for i, r in enumerate(rows)}
    family = {r["id"]: index_of[r["id"]] // 5 for r in rows}

    def leaked(split):
        trained = {family[r["id"]] for r in split["train"]}
        return [r for r in split["holdout"] if family[r["id"]] in trained]

    # a domain name whose salted order would put a templated sibling on both sides
    for domain in (f"d{i}" for i in range(50)):
        unfiltered = corpus_module._fill
        first = {}
        order = sorted({r["id"] for r in rows}, key=lambda g: corpus_module.salted(domain, g))
        members = {r["id"]: [r] for r in rows}
        for split, size in corpus_module.SPLIT_SIZES.items():
            first[split] = [members[g][0] for g in unfiltered(domain, split, size, order, members)]
        if leaked(first):
            break
    split = group_split(rows, [r["id"] for r in rows], domain)
    assert len(split["holdout"]) == 4 and not leaked(split)
    assert sorted(r["id"] for r in split["train"]) == sorted(r["id"] for r in first["train"])
    assert {r["id"] for r in leaked(first)} <= {r["id"] for r in split["spare"]}
    assert sorted(r["id"] for s in split.values() for r in s) == sorted(r["id"] for r in rows)


def test_probes_hold_the_true_continuation_and_same_domain_distractors(built):
    root, _ = built
    for domain in DOMAINS:
        train = rows(root, domain, "train")
        text_by_id = {r["id"]: r["text"] for r in train}
        probes = rows(root, domain, "probes")
        assert [p["id"] for p in probes] == [r["id"] + "-probe" for r in train[:N_PROBES]]
        for probe in probes:
            assert probe["domain"] == domain and len(probe["options"]) == 4
            passage = text_by_id[probe["id"].removesuffix("-probe")]
            answer = probe["options"][probe["answer"]]
            assert passage.startswith(probe["prompt"] + answer)
            others = [t for i, t in text_by_id.items() if t != passage]
            for k, option in enumerate(probe["options"]):
                if k != probe["answer"]:
                    assert option.strip() != answer.strip()
                    assert any(option in t for t in others)
            assert len({o.strip() for o in probe["options"]}) == 4


def test_probe_construction_is_deterministic_per_seed(built):
    root, _ = built
    train = rows(root, "science", "train")
    assert make_probes(train, N_PROBES, seed=0) == rows(root, "science", "probes")
    # fewer probes are a prefix of more: results on the first 100 stay comparable
    assert make_probes(train, 100, seed=0) == rows(root, "science", "probes")[:100]
    other = make_probes(train, N_PROBES, seed=1)
    assert other == make_probes(train, N_PROBES, seed=1)
    assert [p["answer"] for p in other] != [
        p["answer"] for p in make_probes(train, N_PROBES, seed=0)
    ]
    assert [sorted(p["options"]) for p in other] == [
        sorted(p["options"]) for p in rows(root, "science", "probes")
    ]


def test_mmlu_subsets_match_the_domain_subjects(built):
    root, _ = built
    for domain in DOMAINS:
        items = rows(root, domain, "mmlu")
        assert {i["subject"] for i in items} == set(MMLU_SUBJECTS[domain])
        assert all(len(i["choices"]) == 4 and i["answer"] in range(4) for i in items)
        assert all(i["question"] != "question" for i in items)  # the stray header rows
    assert len(rows(root, "medical", "mmlu")) == 1417  # 135+265+173+100+272+166+306


def test_ensure_corpus_reuses_a_built_corpus(built, monkeypatch, capsys):
    root, _ = built

    def no_rebuild(_root):
        raise AssertionError("rebuilt a corpus that exists")

    monkeypatch.setattr(corpus_module, "build_corpus", no_rebuild)
    assert ensure_corpus(root) == root
    assert main(["data", "stats", str(root)]) == 0
    assert "legal" in capsys.readouterr().out


def test_corpus_file_rejects_unknown_names(tmp_path):
    with pytest.raises(UserError, match="unknown corpus domain 'cooking'"):
        corpus_file("cooking", "train", tmp_path)
    with pytest.raises(UserError, match="unknown corpus split 'test'"):
        corpus_file("legal", "test", tmp_path)
