"""Datasets by name, read from the on-disk layouts torchvision users already have (no torchvision needed).

| name            | where it is read from (``root`` = ``--data-root``)                       |
|-----------------|---------------------------------------------------------------------------|
| digits          | scikit-learn's bundled 8×8 digits (no files needed)                       |
| mnist           | root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]          |
| fashion-mnist   | root/FashionMNIST/raw/... (same file names as MNIST)                      |
| kmnist          | root/KMNIST/raw/... (Kuzushiji-MNIST, same file names as MNIST)           |
| cifar10         | root/cifar-10-batches-py/{data_batch_1..5,test_batch}                     |
| cifar100        | root/cifar-100-python/{train,test}                                        |
| svhn            | root/{train,test}_32x32.mat                                               |
| imagefolder     | root/{train,test}/<class>/*.png|jpg  (classes in sorted order)            |

Every dataset is held as uint8 tensors (N, C, H, W) — small enough to keep whole on the training device — and is
turned into float images in [-1, 1] batch by batch on that device, where augmentation also happens (airbench-style).
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import sys
import tarfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F


class DatasetError(ValueError):
    """A dataset is missing, corrupt or mis-specified. The message is one line saying what to do."""


@dataclass
class ImageData:
    """A whole dataset as uint8 tensors. ``x_*``: (N, C, H, W) uint8; ``y_*``: (N,) int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    pad: int = 0  # random-crop padding used for augmentation (0 = no crop)
    flip: bool = False  # horizontal flips fit this dataset
    extra: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def from_numpy(cls, name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                   classes: list[str]) -> ImageData:
        """uint8 (N, C, H, W) and int64 (N,) arrays → tensors; labels are checked against ``classes``."""
        for y in (y_train, y_test):
            if len(y) and (y.min() < 0 or y.max() >= len(classes)):
                raise DatasetError(f"corrupt {name}: labels outside 0..{len(classes) - 1}")
        return cls(name, torch.from_numpy(np.ascontiguousarray(x_train)), torch.from_numpy(np.asarray(y_train, np.int64)),
                   torch.from_numpy(np.ascontiguousarray(x_test)), torch.from_numpy(np.asarray(y_test, np.int64)),
                   list(classes))


# ----------------------------------------------------------------------------------------------------------------
# readers
# ----------------------------------------------------------------------------------------------------------------
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MNIST_MIRRORS = {
    "MNIST": ("https://ossci-datasets.s3.amazonaws.com/mnist/", {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }),
    "FashionMNIST": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }),
    # Kuzushiji-MNIST (Clanuwat et al. 2018); checksums as in torchvision.datasets.KMNIST
    "KMNIST": ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/", {
        "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
        "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
        "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
        "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
    }),
}
ARCHIVES = {  # name -> (url, md5, folder it unpacks to)
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                "cifar-10-batches-py"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                 "cifar-100-python"),
}
SVHN_FILES = {
    "train_32x32.mat": ("http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test_32x32.mat": ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "eb5a983be6a315427106f1b2e6ea8b3a"),
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
KMNIST_CLASSES = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file, read in 1 MiB chunks (md5: the datasets' published checksums; sha256: exports)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``dest`` (atomically) and verify its md5; raise DatasetError when offline or corrupt."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"could not download {url} ({e}); place the file at {dest} by hand") from None
    if file_digest(tmp, "md5") != md5:
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"download of {url} failed its md5 check ({md5}); nothing was kept")
    os.replace(tmp, dest)
    return dest


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
            raise ValueError("bad magic number")
        ndim = raw[3]
        dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return data.reshape(dims).copy()
    except (OSError, ValueError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetError(f"corrupt IDX file {path} ({e}); re-download it") from None


def read_mnist_like(root: Path, folder: str, name: str, classes: list[str], download_missing: bool = False) -> ImageData:
    """``root/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (torchvision's layout)."""
    raw = root / folder / "raw"

    def find(stem: str) -> Path:
        for cand in (raw / (stem + ".gz"), raw / stem):
            if cand.exists():
                return cand
        if download_missing:
            base, sums = MNIST_MIRRORS[folder]
            return download(base + stem + ".gz", raw / (stem + ".gz"), sums[stem + ".gz"])
        raise DatasetError(
            f"{folder} not found: expected {raw}/{{{','.join(MNIST_FILES.values())}}}[.gz] "
            f"(torchvision layout; set --data-root to the folder that contains {folder}/, or pass --download)"
        )

    arrays = {k: read_idx(find(v)) for k, v in MNIST_FILES.items()}
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise DatasetError(f"corrupt {folder}: {split} images and labels differ in length; re-download them")
    return ImageData.from_numpy(name, arrays["train_images"][:, None], arrays["train_labels"],
                                arrays["test_images"][:, None], arrays["test_labels"], classes)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python-version batches are pickles: allow only the numpy classes they need, nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DatasetError(f"corrupt CIFAR batch file {path} ({e}); re-download it") from None


def _fetch_archive(root: Path, name: str, download_missing: bool) -> Path:
    url, md5, folder = ARCHIVES[name]
    path = root / folder
    if path.is_dir():
        return path
    if not download_missing:
        raise DatasetError(f"{name} not found: expected {path}/ (the python version from {url}, unpacked; "
                           f"set --data-root to its parent, or pass --download)")
    archive = download(url, root / url.rsplit("/", 1)[1], md5)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return path


def read_cifar(root: Path, name: str, download_missing: bool = False) -> ImageData:
    """The python-version CIFAR archives (``cifar-10-batches-py``, ``cifar-100-python``), numpy-only unpickling."""
    path = _fetch_archive(root, name, download_missing)

    def read(files: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for fname in files:
            if not (path / fname).exists():
                raise DatasetError(f"{name} incomplete: {path / fname} is missing; re-download the archive")
            d = _unpickle(path / fname)
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    if name == "cifar10":
        x_tr, y_tr = read([f"data_batch_{i}" for i in range(1, 6)], "labels")
        x_te, y_te = read(["test_batch"], "labels")
        meta = path / "batches.meta"
        classes = [str(c) for c in _unpickle(meta)["label_names"]] if meta.exists() else CIFAR10_CLASSES
    else:
        x_tr, y_tr = read(["train"], "fine_labels")
        x_te, y_te = read(["test"], "fine_labels")
        meta = path / "meta"
        classes = ([str(c) for c in _unpickle(meta)["fine_label_names"]] if meta.exists()
                   else [str(i) for i in range(100)])
    return ImageData.from_numpy(name, x_tr, y_tr, x_te, y_te, classes)


def read_svhn(root: Path, download_missing: bool = False) -> ImageData:
    """``root/{train,test}_32x32.mat`` (the cropped-digits format)."""
    from scipy.io import loadmat

    out = []
    for fname, (url, md5) in SVHN_FILES.items():
        path = root / fname
        if not path.exists():
            if not download_missing:
                raise DatasetError(f"svhn not found: expected {root}/train_32x32.mat and {root}/test_32x32.mat "
                                   f"(from http://ufldl.stanford.edu/housenumbers/; or pass --download)")
            download(url, path, md5)
        try:
            mat = loadmat(path)
        except Exception as e:  # scipy raises several types for broken files
            raise DatasetError(f"corrupt SVHN file {path} ({e}); re-download it") from None
        x = np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1)).astype(np.uint8)
        y = mat["y"].reshape(-1).astype(np.int64) % 10  # SVHN labels the digit 0 as 10
        out += [x, y]
    return ImageData.from_numpy("svhn", *out, [str(i) for i in range(10)])


IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def _read_image_dir(split_dir: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    files, labels = [], []
    for label, cls in enumerate(classes):
        cdir = split_dir / cls
        found = sorted(p for p in cdir.iterdir() if p.suffix.lower() in IMAGE_EXTS) if cdir.is_dir() else []
        files += found
        labels += [label] * len(found)
    if not files:
        raise DatasetError(f"no images in {split_dir}/<class>/*.png|jpg")

    def load(p: Path) -> np.ndarray:
        try:
            with Image.open(p) as im:
                return np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB"))
        except OSError as e:
            raise DatasetError(f"unreadable image {p} ({e})") from None

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        imgs = list(tqdm(pool.map(load, files, chunksize=256), total=len(files), desc=f"decoding {split_dir}",
                         disable=len(files) < 5000, leave=False))
    shapes = {im.shape for im in imgs}
    if len(shapes) != 1:
        raise DatasetError(f"images in {split_dir} differ in size/channels {sorted(shapes)[:3]}; resize them first")
    x = np.stack(imgs)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), np.asarray(labels, dtype=np.int64)


def read_imagefolder(root: Path) -> ImageData:
    """``root/{train,test}/<class>/*.png``; decoded once, then cached as one .npz under ``$JEMTORCH_CACHE``."""
    train_dir, test_dir = root / "train", root / "test"
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise DatasetError(f"imagefolder not found: expected {root}/train/<class>/*.png and {root}/test/<class>/*.png")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"no class folders in {train_dir}")
    # the cache key covers every image file's path, size and modification time: a file added, removed, replaced or
    # rewritten in place gives another key, so the cache never serves images that no longer match the files
    listing = hashlib.sha1(str(root.resolve()).encode())
    for split_dir in (train_dir, test_dir):
        for f in image_files(split_dir):
            st = f.stat()
            listing.update(f"{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    stamp = f"{listing.hexdigest()}|{classes}"
    cache_dir = Path(os.environ.get("JEMTORCH_CACHE", Path.home() / ".cache" / "jemtorch"))
    cache = cache_dir / f"imagefolder-{hashlib.sha1(stamp.encode()).hexdigest()[:16]}.npz"
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                arrays = [z[k] for k in ("x_train", "y_train", "x_test", "y_test")]
            x_tr, y_tr, x_te, y_te = arrays
            if not (x_tr.dtype == x_te.dtype == np.uint8 and x_tr.ndim == x_te.ndim == 4 and len(x_tr) == len(y_tr)
                    and len(x_te) == len(y_te) and x_tr.shape[1:] == x_te.shape[1:]):
                raise ValueError("arrays of inconsistent shapes")
            return ImageData.from_numpy("imagefolder", x_tr, y_tr, x_te, y_te, classes)
        except (OSError, ValueError, KeyError, EOFError, DatasetError) as e:  # damaged: decoded again, said so
            print(f"jemtorch: the image cache {cache} is damaged ({type(e).__name__}: {str(e)[:80]}); decoding "
                  f"{root} again", file=sys.stderr)
    x_tr, y_tr = _read_image_dir(train_dir, classes)
    x_te, y_te = _read_image_dir(test_dir, classes)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.stem + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache only costs speed next time
    return ImageData.from_numpy("imagefolder", x_tr, y_tr, x_te, y_te, classes)


# ----------------------------------------------------------------------------------------------------------------
# image files and arrays from anywhere (jem score, OOD folders for jem eval)
# ----------------------------------------------------------------------------------------------------------------
ARRAY_EXTS = {".npy", ".npz"}


@dataclass
class ImageSource:
    """One input image: a file, or image ``index`` of an array file (``key`` names the array inside an .npz)."""

    path: Path
    index: Optional[int] = None
    key: Optional[str] = None

    @property
    def name(self) -> str:
        if self.index is None:
            return str(self.path)
        return f"{self.path}" + (f":{self.key}" if self.key else "") + f"[{self.index}]"


def image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder``, recursively (flat or with class subfolders), in sorted order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


MAX_PIXELS = 50_000_000  # larger images are refused before decoding (a 20 000 × 20 000 PNG is a few kB compressed)
MAX_ARRAY_BYTES = 2 << 30  # an .npy/.npz array larger than 2 GiB is refused before it is read


def read_image_file(path: Path) -> np.ndarray:
    """One image file as uint8 (C, H, W): greyscale stays one channel, everything else becomes RGB. A file that is
    not an image, truncated, or larger than ``MAX_PIXELS`` (a decompression bomb) is a DatasetError."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS or w < 1 or h < 1:
                    raise ValueError(f"{w}×{h} pixels: more than the {MAX_PIXELS} read, or none")
                arr = np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16", "I") else "RGB"))
    except (OSError, ValueError, SyntaxError, MemoryError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:  # PIL's errors for truncated, corrupt, unknown or huge files
        raise DatasetError(f"unreadable image {path} ({type(e).__name__}: {str(e)[:120]})") from None
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def images_from_array(arr: np.ndarray, what: str) -> np.ndarray:
    """An array of images as uint8 (N, C, H, W). Accepted: (N, H, W) greyscale, (N, C, H, W) with C in {1, 3},
    (N, H, W, C) with C in {1, 3}; uint8 pixels in [0, 255] or floats in [0, 1] (torchvision's ToTensor scale)."""
    shape = arr.shape
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[1] not in (1, 3) and arr.shape[3] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3) or min(arr.shape[2:]) < 1:
        raise DatasetError(f"{what}: expected images (N, H, W), (N, C, H, W) or (N, H, W, C) with 1 or 3 channels "
                           f"and sides of at least one pixel, got shape {shape}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise DatasetError(f"{what}: float images must be finite and in [0, 1] (or give uint8 pixels)")
        return np.ascontiguousarray(np.round(arr * 255).astype(np.uint8))
    raise DatasetError(f"{what}: images must be uint8 or float, got {arr.dtype}")


def _checked_array(read_header, read, what: str):
    """An array whose header is read first: refused (DatasetError) when it claims more than ``MAX_ARRAY_BYTES``."""
    shape, dtype = read_header()
    if dtype.hasobject or int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > MAX_ARRAY_BYTES:
        raise DatasetError(f"{what}: an array of {shape} {dtype} is not images jemtorch reads (objects, or more than "
                           f"{MAX_ARRAY_BYTES >> 30} GiB)")
    return read()


def _npy_header(f) -> tuple[tuple, np.dtype]:
    version = np.lib.format.read_magic(f)
    shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                       np.lib.format.read_array_header_2_0)(f)
    return shape, dtype


def _load_array_file(path: Path) -> dict[Optional[str], np.ndarray | DatasetError]:
    """The arrays of an .npy or .npz file (never unpickled), each checked by its header before it is read; an array
    that cannot be read is returned as its DatasetError, so that the file's other arrays still are."""
    import zipfile

    def one(what, header, read):
        try:
            return _checked_array(header, read, what)
        except DatasetError as e:
            return e
        except (OSError, ValueError, EOFError, MemoryError, zipfile.BadZipFile) as e:
            return DatasetError(f"unreadable array {what} ({type(e).__name__}: {str(e)[:120]})")

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf, np.load(path, allow_pickle=False) as z:
                out = {}
                for key in z.files:
                    def header(key=key):
                        with zf.open(key + ".npy" if key + ".npy" in zf.namelist() else key) as f:
                            return _npy_header(f)
                    out[key] = one(f"{path}:{key}", header, lambda key=key: z[key])
                return out
        def header():
            with open(path, "rb") as f:
                return _npy_header(f)
        return {None: one(str(path), header, lambda: np.load(path, allow_pickle=False))}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError(f"unreadable array file {path} ({type(e).__name__}: {str(e)[:120]})") from None


def find_images(paths) -> tuple[list[ImageSource], list[tuple[str, str]]]:
    """Expand files, folders (recursively) and .npy/.npz arrays into image sources.

    Returns (sources, failures): ``failures`` lists (path, reason) for paths that do not exist or array files that
    cannot be read — each is skipped, never fatal to the others."""
    sources: list[ImageSource] = []
    failures: list[tuple[str, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            sources += [ImageSource(f) for f in image_files(p)]
        elif not p.exists():
            failures.append((str(p), "no such file or folder"))
        elif p.suffix.lower() in ARRAY_EXTS:
            try:
                arrays = _load_array_file(p)
            except DatasetError as e:
                failures.append((str(p), str(e)))
                continue
            for key, arr in arrays.items():  # one bad array never costs the file's other arrays
                what = f"{p}" + (f":{key}" if key else "")
                try:
                    if isinstance(arr, DatasetError):
                        raise arr
                    sources += [ImageSource(p, i, key) for i in range(len(images_from_array(arr, what)))]
                except DatasetError as e:
                    failures.append((what, str(e)))
        else:
            sources.append(ImageSource(p))
    return sources, failures


class ImageReader:
    """Reads image sources as uint8 (C, H, W) arrays; array files are loaded once and kept while in use."""

    def __init__(self):
        self._arrays: dict[Path, dict[Optional[str], np.ndarray | DatasetError]] = {}

    @staticmethod
    def _images(arr, what: str) -> np.ndarray | DatasetError:
        if isinstance(arr, DatasetError):
            return arr
        try:
            return images_from_array(arr, what)
        except DatasetError as e:  # kept, and raised for this array alone
            return e

    def read(self, src: ImageSource) -> np.ndarray:
        if src.index is None:
            return read_image_file(src.path)
        if src.path not in self._arrays:
            self._arrays = {src.path: {k: self._images(a, f"{src.path}:{k}" if k else str(src.path))
                                       for k, a in _load_array_file(src.path).items()}}
        arr = self._arrays[src.path][src.key]
        if isinstance(arr, DatasetError):
            raise arr
        return arr[src.index]


def read_image_folder(folder: str | Path, limit: Optional[int] = None,
                      seed: int = 0) -> tuple[list[np.ndarray], list[tuple[str, str]]]:
    """Up to ``limit`` images (a seeded random choice) of a folder, recursively, as uint8 (C, H, W) arrays, and the
    (file, reason) of each unreadable one, skipped; no readable image at all is a one-line error."""
    folder = Path(folder)
    files = image_files(folder) if folder.is_dir() else []
    if not files:
        raise DatasetError(f"no images (*.png, *.jpg, ...) in {folder}")
    if limit is not None and limit < len(files):
        g = torch.Generator().manual_seed(seed)
        files = [files[i] for i in sorted(torch.randperm(len(files), generator=g)[:limit].tolist())]
    images, failures = [], []
    for f in files:
        try:
            images.append(read_image_file(f))
        except DatasetError as e:
            failures.append((str(f), str(e)))
    if not images:
        raise DatasetError(f"no readable image in {folder} ({failures[0][1]})")
    return images, failures


def read_digits(seed: int = 0, test_fraction: float = 0.2) -> ImageData:
    """scikit-learn's bundled 8×8 digits (1797 images, 16 grey levels), stratified train/test split, fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    return ImageData.from_numpy("digits", x_tr, y_tr, x_te, y_te, [str(i) for i in range(10)])


# ----------------------------------------------------------------------------------------------------------------
# the registry: a dataset is a reader registered by name, with its augmentation (its training preset is a file:
# jemtorch/presets/<name>.toml, read by config.py)
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetSpec:
    name: str
    reader: Callable[[Path, bool], ImageData]  # (root, download_missing) -> ImageData
    pad: Optional[int]  # random-crop padding (None: 4 for images of 32 px and more, else none)
    flip: bool  # horizontal flips fit this dataset


DATASETS: dict[str, DatasetSpec] = {}
DEFAULT_ROOT = "./data"


def register_dataset(name: str, *, pad: Optional[int] = 0, flip: bool = False):
    """Register ``reader(root, download_missing) -> ImageData`` as dataset ``name``, with its augmentation."""

    def deco(reader: Callable[[Path, bool], ImageData]) -> Callable[[Path, bool], ImageData]:
        DATASETS[name] = DatasetSpec(name, reader, pad, flip)
        return reader

    return deco


@register_dataset("digits", pad=0, flip=False)
def _digits(root: Path, download_missing: bool) -> ImageData:
    return read_digits()


@register_dataset("mnist", pad=2, flip=False)
def _mnist(root: Path, download_missing: bool) -> ImageData:
    return read_mnist_like(root, "MNIST", "mnist", [str(i) for i in range(10)], download_missing)


@register_dataset("fashion-mnist", pad=2, flip=True)
def _fashion_mnist(root: Path, download_missing: bool) -> ImageData:
    return read_mnist_like(root, "FashionMNIST", "fashion-mnist", FASHION_CLASSES, download_missing)


@register_dataset("kmnist", pad=2, flip=False)
def _kmnist(root: Path, download_missing: bool) -> ImageData:
    return read_mnist_like(root, "KMNIST", "kmnist", KMNIST_CLASSES, download_missing)


@register_dataset("cifar10", pad=4, flip=True)
def _cifar10(root: Path, download_missing: bool) -> ImageData:
    return read_cifar(root, "cifar10", download_missing)


@register_dataset("cifar100", pad=4, flip=True)
def _cifar100(root: Path, download_missing: bool) -> ImageData:
    return read_cifar(root, "cifar100", download_missing)


@register_dataset("svhn", pad=4, flip=False)
def _svhn(root: Path, download_missing: bool) -> ImageData:
    return read_svhn(root, download_missing)


@register_dataset("imagefolder", pad=None, flip=True)
def _imagefolder(root: Path, download_missing: bool) -> ImageData:
    return read_imagefolder(root)


def load_dataset(name: str, root: Optional[str | Path] = None, download_missing: bool = False) -> ImageData:
    """Load a registered dataset by name (see module docstring) as uint8 tensors on the CPU."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    spec = DATASETS[name]
    data = spec.reader(Path(root if root is not None else DEFAULT_ROOT).expanduser(), download_missing)
    data.name = name
    data.pad = spec.pad if spec.pad is not None else (4 if data.shape[-1] >= 32 else 0)
    data.flip = spec.flip
    return data


# ----------------------------------------------------------------------------------------------------------------
# OOD sets (jem eval --ood, the OOD thresholds of jem score)
# ----------------------------------------------------------------------------------------------------------------
SYNTHETIC_OOD = ("interp", "uniform", "gaussian", "constant")


def is_folder_set(name: str) -> bool:
    """An OOD set given as a path to a folder of images (rather than a dataset or synthetic set's name); ``~``
    expands to the home folder."""
    return "/" in name or os.sep in name or name.startswith("~") or Path(name).is_dir()


SPLIT_FOLDERS = ("train", "test", "val", "valid", "validation")


def folder_label(name: str) -> str:
    """A folder set's name in tables: the folder's own name, or ``parent-split`` for a split folder
    (``data/cifar100/test`` → ``cifar100-test``, not ``test``)."""
    path = Path(name.rstrip("/")).expanduser()
    if path.name.lower() in SPLIT_FOLDERS and path.parent.name not in ("", ".", ".."):
        return f"{path.parent.name}-{path.name}"
    return path.name or name


def ood_labels(names) -> dict[str, str]:
    """How each OOD set is named in tables: its name, or a folder's (``folder_label``; made unique when two
    collide)."""
    labels: dict[str, str] = {}
    for name in names:
        label = folder_label(name) if is_folder_set(name) else name
        base, k = label, 2
        while label in labels.values():
            label, k = f"{base}-{k}", k + 1
        labels[name] = label
    return labels


def check_ood_name(name: str, in_dataset: Optional[str] = None) -> None:
    """Raise a one-line DatasetError for an unknown OOD set, a missing folder, or the in-distribution dataset."""
    if is_folder_set(name):
        if not Path(name).expanduser().is_dir():
            raise DatasetError(f"OOD folder {name} not found")
        return
    if name not in SYNTHETIC_OOD and name not in DATASETS:
        raise DatasetError(f"unknown OOD set {name!r}; choose from {', '.join(SYNTHETIC_OOD + tuple(DATASETS))}, "
                           f"or give a path to a folder of images")
    if name == in_dataset:
        raise DatasetError(f"OOD set {name!r} is the in-distribution dataset")


def interpolation_pairs(n_images: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` index pairs (i, j), i ≠ j, of the images that ``make_ood_set``'s "interp" blends, drawn with ``g``."""
    i = torch.randint(0, n_images, (n,), generator=g)
    return i, (i + torch.randint(1, n_images, (n,), generator=g)) % n_images  # j: a different image


def make_ood_set(name: str, x_in: torch.Tensor, n: int, seed: int = 0, data_root: Optional[str] = None,
                 in_dataset: Optional[str] = None) -> torch.Tensor:
    """``n`` OOD images as floats in [−1, 1] with the shape of ``x_in`` (float in-distribution test images)."""
    check_ood_name(name, in_dataset)
    g = torch.Generator().manual_seed(seed)
    shape = tuple(x_in.shape[1:])
    if name == "uniform":
        return torch.rand((n, *shape), generator=g) * 2 - 1
    if name == "gaussian":
        return torch.randn((n, *shape), generator=g).clamp(-1, 1)
    if name == "constant":
        return (torch.rand((n, shape[0], 1, 1), generator=g) * 2 - 1).expand(n, *shape).contiguous()
    if name == "interp":
        i, j = interpolation_pairs(len(x_in), n, g)
        return 0.5 * x_in[i].cpu() + 0.5 * x_in[j].cpu()
    if is_folder_set(name):  # any folder of images, flat or with class subfolders; no train/ needed
        images, failures = read_image_folder(Path(name).expanduser(), limit=n, seed=seed)
        if failures:  # never silent, never fatal
            print(f"jemtorch: skipped {len(failures)} unreadable image(s) in {name}, e.g. {failures[0][1]}",
                  file=sys.stderr)
        x, _ = stack_converted(images, shape)
        return to_float(x)
    x = load_dataset(name, data_root).x_test  # a dataset name (checked above)
    x = x[torch.randperm(len(x), generator=g)[:n]]
    return to_float(convert_images(x, shape))


# ----------------------------------------------------------------------------------------------------------------
# splits
# ----------------------------------------------------------------------------------------------------------------
def stratified_split(y: torch.Tensor, n_holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (keep, holdout) with ``n_holdout`` examples held out, stratified by label."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    if n_holdout <= 0:
        return torch.from_numpy(idx), torch.from_numpy(idx[:0])
    keep, hold = train_test_split(idx, test_size=n_holdout, stratify=y.numpy(), random_state=seed)
    return torch.from_numpy(np.sort(keep)), torch.from_numpy(np.sort(hold))


@dataclass
class Splits:
    """Train / validation / test tensors of one run, on its device (uint8 images, int64 labels)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def training_splits(data: ImageData, n_valid: int, seed: int, device: torch.device | str) -> Splits:
    """Hold out ``n_valid`` training images (stratified; -1: 10%) for validation; everything moved to ``device``."""
    n_valid = n_valid if n_valid >= 0 else len(data.y_train) // 10
    train_idx, val_idx = stratified_split(data.y_train, n_valid, seed)
    return Splits(data.x_train[train_idx].to(device), data.y_train[train_idx].to(device),
                  data.x_train[val_idx].to(device), data.y_train[val_idx].to(device),
                  data.x_test.to(device), data.y_test.to(device))


def labeled_subset(y: torch.Tensor, labels_per_class: int, seed: int) -> torch.Tensor:
    """Indices of ``labels_per_class`` examples per class (semi-supervised training keeps labels only for these)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        if len(idx) < labels_per_class:
            raise DatasetError(f"class {int(c)} has only {len(idx)} training examples, fewer than labels_per_class")
        out.append(idx[torch.randperm(len(idx), generator=g)[:labels_per_class]])
    return torch.sort(torch.cat(out)).values


# ----------------------------------------------------------------------------------------------------------------
# on-device batches and augmentation
# ----------------------------------------------------------------------------------------------------------------
def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [-1, 1] (the paper's scaling)."""
    return x.float().mul_(2.0 / 255.0).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] → uint8 [0, 255] (clamped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)


def convert_images(x_u8: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 images → the model's (C, H, W): grey→RGB repeats the channel, RGB→grey uses luma; bilinear resize."""
    c, h, w = shape
    x = x_u8.float()
    if x.shape[1] == 1 and c == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and c == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif x.shape[1] != c:
        raise DatasetError(f"cannot convert {x.shape[1]}-channel images to {c} channels")
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def stack_converted(images: list[np.ndarray], shape: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
    """uint8 (C, H, W) arrays of any sizes → one uint8 (N, *shape) tensor via ``convert_images``; also returns how
    many images needed converting."""
    out = torch.empty((len(images), *shape), dtype=torch.uint8)
    converted = 0
    for i, im in enumerate(images):
        t = torch.from_numpy(np.require(im, requirements=["C", "W"]))[None]  # writable: torch refuses read-only
        if tuple(t.shape[1:]) != tuple(shape):
            t = convert_images(t, shape)
            converted += 1
        out[i] = t[0]
    return out, converted


def augment(x: torch.Tensor, pad: int = 0, flip: bool = False, noise: float = 0.0) -> torch.Tensor:
    """Batched augmentation on x's device: reflect-pad + random crop, random horizontal flip, Gaussian noise."""
    b, _, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        oy = torch.randint(0, 2 * pad + 1, (b, 1, 1), device=x.device)
        ox = torch.randint(0, 2 * pad + 1, (b, 1, 1), device=x.device)
        rows = (oy + torch.arange(h, device=x.device).view(1, h, 1)).expand(b, h, w)
        cols = (ox + torch.arange(w, device=x.device).view(1, 1, w)).expand(b, h, w)
        bi = torch.arange(b, device=x.device).view(b, 1, 1).expand(b, h, w)
        x = xp.permute(0, 2, 3, 1)[bi, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(b, 1, 1, 1, device=x.device) < 0.5
        x = torch.where(mask, x.flip(3), x)
    if noise > 0:
        x = x + noise * torch.randn_like(x)
    return x


class BatchStream:
    """Endless shuffled batches of a uint8 tensor dataset kept on the device.

    Batch ``i`` is a pure function of (seed, i): epoch ``i // batches_per_epoch`` uses its own seeded permutation, so a
    resumed run sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, x: torch.Tensor, y: Optional[torch.Tensor], batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if len(x) == 0:
            raise DatasetError("cannot draw batches from an empty dataset")
        self.x, self.y = x, y
        self.rank, self.world_size = rank, world_size
        self.batch_size = min(batch_size, len(x) // world_size)
        if self.batch_size < 1:
            raise DatasetError(f"{len(x)} training images cannot feed {world_size} processes")
        self.seed = seed
        # drop_last; under torch.distributed the step's global batch is world_size × batch_size consecutive images of
        # the epoch's permutation, rank r taking the r-th slice: disjoint shards, a pure function of the step
        self.batches_per_epoch = len(x) // (self.batch_size * world_size)
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(len(self.x), generator=g).to(self.x.device)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, i: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        epoch, pos = divmod(i, self.batches_per_epoch)
        start = (pos * self.world_size + self.rank) * self.batch_size
        idx = self._permutation(epoch)[start : start + self.batch_size]
        return self.x[idx], (self.y[idx] if self.y is not None else None)
