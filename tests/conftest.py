import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _small_threads_and_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JEMTORCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available (../shared/data)")
    return path


os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory):
    """A tiny JEM run on digits and its --p-x-weight 0 baseline (root/jem, root/base), shared by eval and attack tests."""
    from jemtorch.cli import main

    root = tmp_path_factory.mktemp("runs")
    # 6 epochs without warm-up: the digits preset's 100 warm-up iterations would outlast a 3-epoch run (60
    # iterations) and leave the model at chance, and the attack tests need images it classifies correctly (a chance
    # model got 0 of 8 right in one clean-clone CI run: tests/test_robustness.py::test_blackbox_attacks)
    args = ["--model", "cnn-8", "--sgld-steps", "1", "--buffer-size", "100", "--epochs", "6", "--lr", "0.005",
            "--warmup-iters", "0", "--no-progress"]
    assert main(["train", *args, "--out", str(root / "jem")]) == 0
    assert main(["train", *args, "--p-x-weight", "0", "--out", str(root / "base")]) == 0
    return root
