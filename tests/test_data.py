import gzip
import pickle
import shutil
import struct
import tarfile

import numpy as np
import pytest
import torch

from conftest import shared_data
from jemtorch.data import BatchStream, DatasetError, augment, labeled_subset, load_dataset, read_idx, stratified_split, to_float, to_uint8


def write_idx(path, arr, gz=True):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def make_mnist(root, folder="MNIST", n=(30, 10), gz=True):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for split, count in zip(("train", "t10k"), n):
        write_idx(raw / f"{split}-images-idx3-ubyte{sfx}", rng.integers(0, 256, (count, 28, 28)), gz)
        write_idx(raw / f"{split}-labels-idx1-ubyte{sfx}", np.arange(count) % 10, gz)


@pytest.mark.parametrize("name,folder,gz", [("mnist", "MNIST", True), ("fashion-mnist", "FashionMNIST", False)])
def test_mnist_format(tmp_path, name, folder, gz):
    make_mnist(tmp_path, folder, gz=gz)
    d = load_dataset(name, tmp_path)
    assert d.x_train.shape == (30, 1, 28, 28) and d.x_train.dtype == torch.uint8
    assert d.x_test.shape == (10, 1, 28, 28)
    assert d.y_train.tolist() == [i % 10 for i in range(30)]
    assert d.num_classes == 10


def test_mnist_missing_names_expected_files(tmp_path):
    with pytest.raises(DatasetError, match="MNIST/raw/.*train-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path)


def test_idx_corrupt(tmp_path):
    make_mnist(tmp_path)
    p = tmp_path / "MNIST/raw/train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(DatasetError, match="corrupt"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "x.idx").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DatasetError, match="corrupt"):
        read_idx(tmp_path / "x.idx")


def make_cifar10(root):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 9]}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                     "truck"]}, f, protocol=2)
    return d


def test_cifar10_format(tmp_path):
    d = make_cifar10(tmp_path)
    data = load_dataset("cifar10", tmp_path)
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    assert data.classes[9] == "truck" and data.pad == 4 and data.flip
    raw = pickle.load(open(d / "test_batch", "rb"))
    assert np.array_equal(data.x_test.numpy().reshape(4, -1), raw["data"])


def test_cifar100_format(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for split, n in (("train", 6), ("test", 3)):
        pickle.dump({"data": np.zeros((n, 3072), np.uint8), "fine_labels": list(range(n)), "coarse_labels": [0] * n},
                    open(d / split, "wb"), protocol=2)
    data = load_dataset("cifar100", tmp_path)
    assert data.num_classes == 100 and data.x_train.shape == (6, 3, 32, 32)


def test_cifar_refuses_pickled_code(tmp_path):
    d = make_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    pickle.dump({"data": Evil(), "labels": []}, open(d / "test_batch", "wb"))
    with pytest.raises(DatasetError, match="refusing to unpickle"):
        load_dataset("cifar10", tmp_path)


def test_svhn_format(tmp_path):
    from scipy.io import savemat

    for split, n in (("train", 5), ("test", 3)):
        savemat(tmp_path / f"{split}_32x32.mat",
                {"X": np.full((32, 32, 3, n), 7, np.uint8), "y": np.array([[10], [1], [2], [3], [4]][:n], np.uint8)})
    data = load_dataset("svhn", tmp_path)
    assert data.x_train.shape == (5, 3, 32, 32) and data.y_train.tolist() == [0, 1, 2, 3, 4]
    assert not data.flip


def test_imagefolder_format(tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "ant"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    data = load_dataset("imagefolder", tmp_path)
    assert data.classes == ["ant", "cat"]
    assert data.x_train.shape == (6, 3, 32, 32) and data.y_train.tolist() == [0, 0, 0, 1, 1, 1]
    again = load_dataset("imagefolder", tmp_path)  # from the cache
    assert torch.equal(again.x_train, data.x_train)


def test_imagefolder_missing(tmp_path):
    with pytest.raises(DatasetError, match="train/<class>"):
        load_dataset("imagefolder", tmp_path)


def test_digits_split_is_stratified_and_fixed():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.x_test, b.x_test)
    assert a.x_train.shape[1:] == (1, 8, 8) and len(a.x_train) + len(a.x_test) == 1797
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    assert a.x_train.max() == 255


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet")


def test_splits():
    y = torch.arange(100) % 5
    keep, hold = stratified_split(y, 20, seed=0)
    assert len(hold) == 20 and torch.bincount(y[hold]).tolist() == [4] * 5
    assert len(set(keep.tolist()) | set(hold.tolist())) == 100
    lab = labeled_subset(y, 3, seed=0)
    assert torch.bincount(y[lab]).tolist() == [3] * 5


def test_scaling_and_augmentation():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
    assert to_float(x).flatten().tolist() == [-1.0, 1.0]
    img = to_float(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8))
    assert torch.equal(to_uint8(img), to_uint8(to_float(to_uint8(img))))
    out = augment(img, pad=4, flip=True, noise=0.0)
    assert out.shape == img.shape
    # each augmented image is a crop of the reflect-padded (possibly flipped) original: values come from the original
    assert set(out[0].unique().tolist()) <= set(img[0].unique().tolist())
    assert torch.equal(augment(img, pad=0, flip=False, noise=0.0), img)
    noisy = augment(img, noise=0.03)
    assert 0.02 < (noisy - img).std() < 0.04


def test_crop_shifts_content():
    img = torch.zeros(64, 1, 8, 8)
    img[:, :, 4, 4] = 1.0
    out = augment(img, pad=2)
    positions = {tuple(torch.nonzero(o[0] == 1)[0].tolist()) for o in out}
    assert len(positions) > 5 and all(2 <= r <= 6 and 2 <= c <= 6 for r, c in positions)


def test_batch_stream_is_a_function_of_step():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    s1, s2 = BatchStream(x, None, 3, seed=1), BatchStream(x, None, 3, seed=1)
    assert s1.batches_per_epoch == 3
    epoch0 = torch.cat([s1.batch(i)[0] for i in range(3)]).flatten().tolist()
    assert len(set(epoch0)) == 9  # drop_last, no repeats within an epoch
    assert torch.equal(s1.batch(7)[0], s2.batch(7)[0])


# --- the real files in ../shared/data (skipped where absent) ---
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_real_mnist_files(name, folder):
    root = shared_data(folder).parent
    d = load_dataset(name, root)
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(d.y_test, minlength=10).min() >= 892 and d.y_test.max() == 9  # smallest class: 892
    assert 0.12 < d.x_train[:1000].float().mean() / 255 < 0.35


def test_real_cifar10_png(tmp_path):
    archive = shared_data("cifar10-png.tar.gz")
    per_class: dict[str, int] = {}
    with tarfile.open(archive, "r|gz") as tar:  # a stream: the test split comes first, stop where train/ begins
        for m in tar:
            if m.name.startswith("cifar10/train"):
                break
            if m.isfile():  # 200 test images per class are enough to check
                cls = m.name.split("/")[2]
                per_class[cls] = per_class.get(cls, 0) + 1
                if per_class[cls] > 200:
                    continue
            tar.extract(m, tmp_path, filter="data")
    for cls in sorted(p.name for p in (tmp_path / "cifar10/test").iterdir()):  # a small train/ beside it
        (tmp_path / "cifar10/train" / cls).mkdir(parents=True)
        for f in sorted((tmp_path / "cifar10/test" / cls).iterdir())[:2]:
            shutil.copy(f, tmp_path / "cifar10/train" / cls / f.name)
    d = load_dataset("imagefolder", tmp_path / "cifar10")
    assert d.classes[0] == "airplane" and d.classes[-1] == "truck"
    assert d.x_test.shape == (2000, 3, 32, 32) and torch.bincount(d.y_test).tolist() == [200] * 10
    mean = d.x_test.float().mean(dim=(0, 2, 3)) / 255  # CIFAR-10's channel means, within a sample's error
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=0.015)


def test_download_verifies_md5_and_fails_clearly(tmp_path, monkeypatch):
    import hashlib
    import io
    import urllib.request

    from jemtorch import data as D

    payload = b"hello"
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    good = D.download("http://x/f", tmp_path / "f", hashlib.md5(payload).hexdigest())
    assert good.read_bytes() == payload
    with pytest.raises(DatasetError, match="md5"):
        D.download("http://x/g", tmp_path / "g", "0" * 32)
    assert not (tmp_path / "g").exists() and not (tmp_path / "g.part").exists()

    def offline(url, timeout):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetError, match="could not download .* place the file at"):
        load_dataset("mnist", tmp_path / "empty", download_missing=True)
