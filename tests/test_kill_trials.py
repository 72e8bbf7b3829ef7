"""benchmarks/kill_trials.py's moments in the suite: `crma train` killed by SIGKILL while
writing a commit's files and right after its last commit point, then run again, ends with the
same files, byte for byte, as a run never killed (a kill mid-training: tests/test_protocol.py)."""

from __future__ import annotations

import pytest
from helpers import kill_harness

pytestmark = pytest.mark.integration  # every test here runs crma in killed subprocesses
harness = kill_harness()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("kill") / "ref"
    return out, harness.reference("train", out)


@pytest.mark.parametrize("point", ["commit-file:2", "commit:2"])
def test_train_killed_anywhere_and_rerun_ends_byte_identical(reference, tmp_path, point):
    ref, counts = reference
    event, _, n = point.partition(":")
    assert counts[event] >= int(n), "the moment happens in an uninterrupted run"
    assert harness.trial("train", point, tmp_path / "stack", ref) == []
