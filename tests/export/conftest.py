"""Fixtures of the export tests."""
import pytest

from helpers import CASES, tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {bb: tiny_checkpoint(root / f"{bb}.pt", cfg) for bb, (cfg, _, _) in CASES.items()}
