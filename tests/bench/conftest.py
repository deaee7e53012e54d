"""The bench tests' fixture: a tiny ImageFolder, one per test module."""
from pathlib import Path

import pytest

from sslight_dali.synth import synth_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench_data")
    synth_dataset(root, classes=4, per_class=4, val_per_class=1, min_side=40, max_side=64)
    return root
