"""Stream segmentation metrics against values worked out by hand on a 30-document stream."""

from __future__ import annotations

import pytest

from crma.stream.metrics import adjusted_rand_index, match, pool, score_stream

# Truth: A for 10 documents, B for 10, A again for 10 (boundaries 10 and 20; A's return is a
# revisit). Detected: boundaries 12, 19 and 25; 19 goes back to new-1 (a known domain).
TRUTH = [
    {"start": 0, "end": 10, "domain": "A"},
    {"start": 10, "end": 20, "domain": "B"},
    {"start": 20, "end": 30, "domain": "A"},
]
DETECTED = [
    {"start": 0, "end": 12, "domain": "new-1", "new": True, "decided_at": 4},
    {"start": 12, "end": 19, "domain": "new-2", "new": True, "decided_at": 15},
    {"start": 19, "end": 25, "domain": "new-1", "new": False, "decided_at": 23},
    {"start": 25, "end": 30, "domain": "new-3", "new": True, "decided_at": 27},
]


def test_matching_is_one_to_one_within_the_margin():
    assert match([10, 20], [12, 19, 25], margin=3) == [(10, 12), (20, 19)]
    assert match([10, 20], [12, 19, 25], margin=1) == [(20, 19)]
    assert match([10], [9, 11], margin=2) == [(10, 9)]  # one detection per true boundary
    assert match([10], [], margin=5) == []


def test_stream_score_matches_hand_computation():
    s = score_stream(TRUTH, DETECTED, margin=3)
    assert (s.docs, s.true, s.detected, s.matched) == (30, 2, 3, 2)
    assert s.delays == [15 - 10, 23 - 20]
    assert s.new_known_right == 2  # 12 opened B as new (right), 19 went back to A (right)
    assert (s.adapters, s.true_adapters) == (3, 2)
    # Contingency (rows A, B; columns new-1, new-2, new-3): A = [15, 0, 5], B = [3, 7, 0].
    pairs = 105 + 10 + 3 + 21  # C(15,2) + C(5,2) + C(3,2) + C(7,2)
    rows, cols, total = 190 + 45, 153 + 21 + 10, 435  # C(20,2)+C(10,2); C(18,2)+...; C(30,2)
    expected = rows * cols / total
    assert s.ari == pytest.approx((pairs - expected) / ((rows + cols) / 2 - expected))


def test_pooled_figures_match_hand_computation():
    p = pool([score_stream(TRUTH, DETECTED, margin=3)])
    assert p["precision"] == pytest.approx(2 / 3) and p["recall"] == 1.0
    assert p["f1"] == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))
    assert p["delay_mean"] == 4.0
    assert p["delay_p90"] == pytest.approx(3 + 0.9 * (5 - 3))  # linear between the two
    assert p["false_alarms_per_10k"] == pytest.approx(1e4 * 1 / 30)
    assert p["new_known_accuracy"] == 1.0 and p["adapters_exact"] == 0


def test_known_domains_make_a_first_appearance_a_revisit():
    detected = [dict(d) for d in DETECTED]
    s = score_stream(TRUTH, detected, margin=3, known={"B"})
    assert s.true_adapters == 1  # only A is new
    assert s.new_known_right == 1  # boundary 10 enters known B but 12 was called new


def test_ari_of_identical_and_relabelled_partitions():
    assert adjusted_rand_index(list("aabbcc"), list("xxyyzz")) == 1.0
    # One segment for a two-domain stream: no agreement beyond chance.
    assert adjusted_rand_index(list("aabb"), list("xxxx")) == 0.0


def test_never_detecting_scores_zero_recall_and_perfect_precision():
    one = [{"start": 0, "end": 30, "domain": "new-1", "new": True, "decided_at": 4}]
    p = pool([score_stream(TRUTH, one, margin=10)])
    assert (p["precision"], p["recall"], p["f1"], p["false_alarms_per_10k"]) == (1.0, 0.0, 0.0, 0.0)
    assert p["delay_mean"] is None
