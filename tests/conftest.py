import os
import shutil
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# the tiny JEM every reading command is tested on: 6 epochs of digits without warm-up (the preset's 100 warm-up
# iterations would outlast it and leave the model at chance)
TINY_RUN = ["--model", "cnn-8", "--sgld-steps", "1", "--buffer-size", "100", "--epochs", "6", "--lr", "0.005",
            "--warmup-iters", "0", "--no-progress"]


if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per test worker: -n 2 on 2 cores, not 4 threads fighting
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
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
    """A tiny JEM run on digits and its --p-x-weight 0 baseline (root/jem, root/base), trained once for the session
    and shared by every test that only reads runs (eval, score, export, attack)."""
    from jemtorch.cli import main

    root = tmp_path_factory.mktemp("runs")
    assert main(["train", *TINY_RUN, "--out", str(root / "jem")]) == 0
    assert main(["train", *TINY_RUN, "--p-x-weight", "0", "--out", str(root / "base")]) == 0
    return root


@pytest.fixture
def run_copy(trained_runs, tmp_path):
    """A private copy of the tiny JEM run, for tests that damage or change it."""
    def copy(kind: str = "jem") -> Path:
        dst = tmp_path / f"copy-{kind}"
        shutil.copytree(trained_runs / kind, dst, ignore=shutil.ignore_patterns("eval", "robustness"))
        return dst
    return copy


def grey_imagefolder(root: Path, per_class: int = 3, classes=("a", "b"), side: int = 4) -> Path:
    """``root/{train,test}/<class>/<i>.png``: flat grey images (level 10·i), an imagefolder dataset."""
    import numpy as np
    from PIL import Image

    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((side, side), 10 * i, np.uint8)).save(root / split / c / f"{i}.png")
    return root
