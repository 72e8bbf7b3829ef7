import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)


def _real_home() -> Path:
    from crma.model import crma_home

    return crma_home()


@pytest.fixture(scope="session", autouse=True)
def crma_home(tmp_path_factory) -> Path:
    """A temporary CRMA_HOME for the whole session (subprocesses inherit it), so tests never
    write to the user's cache. The user's finished embedded-model and corpus builds are linked
    in, read-only inputs that would otherwise take minutes to rebuild; what is missing is
    built into the temporary home, once per session."""
    real, home = _real_home(), tmp_path_factory.mktemp("crma-home")
    for kind, marker in (("models", "config.json"), ("corpus", "manifest.json")):
        (home / kind).mkdir()
        for entry in sorted((real / kind).glob("*")):
            if (entry / marker).is_file():  # complete: nothing will be written into it
                (home / kind / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRMA_HOME", str(home))
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        yield home


@pytest.fixture(scope="session")
def tokenizer():
    from tiny import tiny_tokenizer

    return tiny_tokenizer()
