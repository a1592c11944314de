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
