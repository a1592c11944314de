"""Using a trained JEM: ``jemtorch.load``, ``jem score`` and ``jem export``.

    model = jemtorch.load("runs/fashion-mnist-cnn-16")      # a run directory, or a folder written by `jem export`
    model.predict(images)                                    # class indices
    model.score(images)                                      # pred, confidence, logp, gradnorm, ood score and flag
    model.score_paths(["photos/", "more.npy"])               # files, folders (recursively), .npy/.npz arrays

Images go in as uint8 pixels (any size and channel count: converted exactly as ``jem eval`` converts OOD sets) or as
float tensors already in the model's units ([−1, 1], the model's (C, H, W)).

The OOD flag: a detector's score (``detectors.py``: the JEM's own scores or a post-hoc detector fitted on the run's
training split) below a threshold chosen on in-distribution validation images so that a target fraction (``tpr``,
default 0.95) of them passes. Which detector: the one whose validation images are told apart best from synthetic
outliers made from them (uniform, Gaussian and constant noise, midpoints of pairs), by mean AUROC, among the detectors
that read the model (not ``length``) — chosen once per weights and said. The validation scores are kept as 1001
quantiles in ``RUN/ood_calibration.json`` (and in an export's model card), the fitted detectors in
``detectors.safetensors``, so every later scoring uses the same thresholds, for any ``tpr``.

Files from others: an export loads its weights (safetensors, checked against the card's SHA-256, from inside the
export folder only) and never imports code unless ``trust_code=True`` (``--trust-code``) — see README "Opening runs
and exports from others".
"""
from __future__ import annotations

import contextlib
import inspect
import io
import json
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .build import LoadedRun, load_run, pick_device, run_detectors
from .checkpoint import CheckpointError, write_atomic
from .data import SYNTHETIC_OOD, DatasetError, ImageReader, file_digest, find_images, make_ood_set, stack_converted, to_float
from .detectors import DETECTORS, OWN, Detector, FittedDetectors
from .energy import JEM
from .metrics import ood_metrics
from .models import create_model
from .models.registry import check_logits
from .models.wrn import model_as_written
from .rundir import OOD_CALIBRATION, SUMMARY, RunDir
from .version import __version__

__all__ = ["load", "Predictor", "OODCalibration", "export", "SCALING"]

MODEL_CARD = "model.json"
WEIGHTS = "model.safetensors"
DETECTORS_FILE = "detectors.safetensors"
ONNX_FILE = "model.onnx"
CARD_FORMAT = "jemtorch.model/1"
SCALING = "uint8 pixels p in [0, 255] -> p / 127.5 - 1 in [-1, 1], channels first (C, H, W)"
N_QUANTILES = 1001
N_CALIBRATION = 2000  # validation images the OOD thresholds are fitted on (at most)


# ------------------------------------------------------------------------------------------------------------------
# OOD thresholds
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class OODCalibration:
    """Quantiles of each detector's score on in-distribution validation images, and the default detector."""

    score: str  # the default detector
    quantiles: dict[str, list[float]]  # detector -> N_QUANTILES quantiles (levels 0, 0.001, ..., 1)
    auroc: dict[str, float]  # detector -> mean AUROC, validation images vs the synthetic outliers made from them
    n_images: int

    def threshold(self, tpr: float, score: Optional[str] = None) -> float:
        """The score value that ``tpr`` of the validation images reach or exceed."""
        if not 0 < tpr <= 1:
            raise ValueError(f"--tpr must be in (0, 1], got {tpr}")
        q = np.asarray(self.quantiles[score or self.score])
        return float(np.interp(1.0 - tpr, np.linspace(0, 1, len(q)), q))

    def reason(self) -> str:
        return (f"{self.score} (mean AUROC {self.auroc[self.score]:.3f} on {self.n_images} validation images vs "
                f"synthetic outliers made from them; " + ", ".join(f"{k} {v:.3f}" for k, v in self.auroc.items()) + ")")

    def to_dict(self) -> dict:
        return {"score": self.score, "auroc": self.auroc, "n_images": self.n_images, "quantiles": self.quantiles}

    @classmethod
    def from_dict(cls, d, where: str) -> OODCalibration:
        """A calibration read from a file: every part checked (a damaged or hostile file is a CheckpointError)."""
        try:
            if not isinstance(d, dict) or not isinstance(d.get("quantiles"), dict) or not isinstance(d.get("auroc"), dict):
                raise TypeError("not an object of score, quantiles, auroc, n_images")
            names = [k for k in d["quantiles"] if k in DETECTORS]
            cal = cls(str(d["score"]), {k: [float(v) for v in d["quantiles"][k]] for k in names},
                      {k: float(d["auroc"][k]) for k in names}, int(d["n_images"]))
        except (KeyError, TypeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{where}: malformed OOD calibration ({type(e).__name__}: {str(e)[:100]})") from None
        if cal.score not in cal.quantiles or any(len(q) < 2 or not np.all(np.isfinite(q)) or np.any(np.diff(q) < 0)
                                                 for q in cal.quantiles.values()):
            raise CheckpointError(f"{where}: malformed OOD calibration")
        return cal

    @classmethod
    def fit(cls, jem: JEM, dets: FittedDetectors, x_val: torch.Tensor, seed: int = 0,
            progress: bool = False) -> OODCalibration:
        """Fit on float validation images ``x_val``: every detector of ``dets``."""
        s_in = dets.score(jem, x_val, progress=progress, desc="OOD calibration")
        aurocs: dict[str, list[float]] = {k: [] for k in dets.names}
        for name in SYNTHETIC_OOD:
            s_out = dets.score(jem, make_ood_set(name, x_val, len(x_val), seed=seed + 1))
            for k in dets.names:
                aurocs[k].append(ood_metrics(s_in[k], s_out[k])["auroc"])
        auroc = {k: float(np.mean(v)) for k, v in aurocs.items()}
        levels = np.linspace(0, 1, N_QUANTILES)
        quantiles = {k: [float(v) for v in np.quantile(s_in[k].astype(np.float64), levels)] for k in dets.names}
        models = [k for k in dets.names if not DETECTORS[k].model_free] or list(dets.names)
        return cls(max(models, key=lambda k: auroc[k]), quantiles, auroc, len(x_val))


# ------------------------------------------------------------------------------------------------------------------
# a model ready to use
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Predictor:
    """A trained JEM in eval mode, with what it takes to feed it: ``classes``, ``input_shape`` (C, H, W), ``SCALING``.

    ``jem`` is the energy model itself (``jem.f`` the classifier); ``calibration`` the OOD thresholds and
    ``detectors`` the fitted detectors (for a run directory: fitted on first use and stored with the run)."""

    jem: JEM
    classes: list[str]
    input_shape: tuple[int, int, int]
    source: Path
    device: torch.device
    card: dict = field(default_factory=dict)
    calibration_: Optional[OODCalibration] = None
    detectors_: Optional[FittedDetectors] = None
    run: Optional[LoadedRun] = None  # a run directory's loaded run (its splits fit detectors and thresholds)
    scaling: str = SCALING
    notices: list[str] = field(default_factory=list)

    @property
    def run_cfg(self):
        return self.run.cfg if self.run is not None else None

    @property
    def run_data(self):
        return self.run.data if self.run is not None else None

    # inputs -----------------------------------------------------------------------------------------------------
    def prepare(self, images) -> torch.Tensor:
        """uint8 images (any size/channels; (N, C, H, W) tensor or array, or a list of (C, H, W) arrays) → floats in
        the model's shape; float tensors are taken as model units and must have the model's shape."""
        if isinstance(images, (list, tuple)):
            x, _ = stack_converted([np.asarray(im) for im in images], self.input_shape)
            return to_float(x)
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        if x.ndim == 3:
            x = x[None]
        if x.dtype == torch.uint8:
            x, _ = stack_converted(list(x.cpu().numpy()), self.input_shape)
            return to_float(x)
        if not x.is_floating_point() or tuple(x.shape[1:]) != tuple(self.input_shape):
            raise ValueError(f"float images must be model units in [-1, 1] of shape (N, {', '.join(map(str, self.input_shape))})"
                             f"; got {x.dtype} {tuple(x.shape)} (give uint8 pixels to have them converted)")
        return x.float()

    # outputs ----------------------------------------------------------------------------------------------------
    def logits(self, images, batch_size: int = 500) -> torch.Tensor:
        return self.jem.logits(self.prepare(images), batch_size).cpu()

    def predict(self, images, batch_size: int = 500) -> torch.Tensor:
        """Predicted class index of every image."""
        return self.logits(images, batch_size).argmax(1)

    def predict_proba(self, images, batch_size: int = 500) -> torch.Tensor:
        """p(y|x) for every image, shape (N, classes)."""
        return self.logits(images, batch_size).softmax(1)

    @property
    def detectors(self) -> FittedDetectors:
        """The detectors: the JEM's own scores, and the post-hoc ones fitted on the run's training split (an export
        brings them in ``detectors.safetensors``; an export of jemtorch 0.1 has the own scores alone)."""
        if self.detectors_ is None:
            if self.run is None:
                # the own scores that need no fit (typicality, complexity, ascent are fitted on a training split)
                self.detectors_ = FittedDetectors({k: DETECTORS[k]() for k in OWN if DETECTORS[k].fit is Detector.fit}, {})
            else:
                self.detectors_ = run_detectors(self.run)
                self.notices += self.run.notices
        return self.detectors_

    @property
    def calibration(self) -> OODCalibration:
        if self.calibration_ is None:
            self.calibration_ = self._fit_calibration()
        return self.calibration_

    def score(self, images, tpr: float = 0.95, score: Optional[str] = None, batch_size: int = 250) -> dict:
        """Per image: ``pred`` (index), ``confidence`` (max p(y|x)), ``logp`` (LogSumExp f(x)), ``gradnorm``
        (−‖∇ₓ log p(x)‖, higher = more in-distribution, as in ``jem eval``), ``ood_score`` (the flagging
        detector's score) and ``ood`` (it is below the threshold for ``tpr``). Numpy arrays."""
        return self._score_floats(self.prepare(images), tpr, score, batch_size)

    def _score_floats(self, x: torch.Tensor, tpr: float, score: Optional[str], batch_size: int) -> dict:
        score = self._check_score(score)
        out, s = self.detectors.outputs_and_scores(self.jem, x, batch_size=batch_size, device=self.device)
        return {"pred": out.logits.argmax(1).numpy(), "confidence": s["maxprob"], "logp": s["logp"],
                "gradnorm": s["gradnorm"], "ood_score": s[score], "ood": s[score] < self.calibration.threshold(tpr, score)}

    def _check_score(self, score: Optional[str]) -> str:
        score = {"energy": "logp", "msp": "maxprob"}.get(score, score) if score else self.calibration.score
        if score not in self.calibration.quantiles:
            have = ", ".join(self.calibration.quantiles)
            raise ValueError(f"--score must be one of {have} for {self.source}, got {score!r}"
                             + (" (re-export the run with jemtorch ≥ 0.2 for the post-hoc detectors)"
                                if score in DETECTORS else ""))
        return score

    def score_paths(self, paths: Sequence[str | Path], tpr: float = 0.95, score: Optional[str] = None,
                    batch_size: int = 250, progress: bool = False) -> ScoreTable:
        """Score files, folders (recursively) and .npy/.npz arrays. Unreadable inputs are listed in the table's
        ``failures`` and skipped; images of another size or channel count are converted (counted in ``converted``)."""
        score = self._check_score(score)
        threshold = self.calibration.threshold(tpr, score)
        sources, failures = find_images(paths)
        table = ScoreTable(score=score, tpr=tpr, threshold=threshold, failures=list(failures), classes=self.classes)
        reader = ImageReader()
        with tqdm(total=len(sources), desc="scoring", unit="img", disable=not progress, leave=False) as bar:
            for i in range(0, len(sources), batch_size):
                chunk, images = [], []
                for src in sources[i : i + batch_size]:
                    try:
                        images.append(reader.read(src))
                        chunk.append(src)
                    except (DatasetError, IndexError, KeyError) as e:
                        table.failures.append((src.name, str(e)))
                if images:
                    x, converted = stack_converted(images, self.input_shape)
                    table.converted += converted
                    table.add([s.name for s in chunk], self._score_floats(to_float(x), tpr, score, batch_size))
                bar.update(len(sources[i : i + batch_size]))
        return table

    def validation_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A run directory's validation images (uint8, (N, C, H, W)) and labels, split exactly as training split
        them. ValueError for an export (it keeps no data) or a run trained without one (--n-valid 0)."""
        from .data import training_splits

        if self.run is None:
            raise ValueError(f"{self.source} is an export, not a run directory: it keeps no validation images")
        val = training_splits(self.run.data, self.run.cfg.n_valid, self.run.cfg.seed, "cpu")
        if len(val.y_val) == 0:
            raise ValueError(f"{self.source} has no validation split (--n-valid 0)")
        return val.x_val, val.y_val

    # OOD calibration of a run directory -------------------------------------------------------------------------
    def _fit_calibration(self) -> OODCalibration:
        if self.run is None:
            raise CheckpointError(f"{self.source}: the export has no OOD calibration; re-export it from its run")
        rd = RunDir(self.source)
        path, weights = rd / OOD_CALIBRATION, file_digest(rd.weights, "sha256")  # thresholds belong to these weights
        if path.is_file():
            try:
                stored = json.loads(path.read_text())
                if isinstance(stored, dict) and stored.get("weights_sha256") == weights:
                    cal = OODCalibration.from_dict(stored, str(path))
                    if set(cal.quantiles) >= set(self.detectors.names):
                        return cal
                self.notices.append(f"{path} belongs to other weights or detectors; fitting it again")
            except (json.JSONDecodeError, CheckpointError, RecursionError, UnicodeDecodeError):
                self.notices.append(f"{path} is malformed; fitting the OOD thresholds again")
        try:
            x_val = to_float(self.validation_split()[0][:N_CALIBRATION])
        except ValueError as e:
            raise ValueError(f"{e}: no images to fit OOD thresholds on") from None
        cal = OODCalibration.fit(self.jem, self.detectors, x_val, seed=self.run.cfg.seed)
        try:
            write_atomic(path, json.dumps({**cal.to_dict(), "weights_sha256": weights}) + "\n")
            self.notices.append(f"OOD thresholds fitted on {cal.n_images} validation images and stored in {path}")
        except CheckpointError as e:
            self.notices.append(f"OOD thresholds fitted on {cal.n_images} validation images but not stored "
                                f"({e}); the next scoring fits them again")
        return cal


@dataclass
class ScoreTable:
    """What ``score_paths`` found: one row per scored image, plus the failures."""

    score: str
    tpr: float
    threshold: float
    classes: list[str]
    rows: list[dict] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    converted: int = 0

    COLUMNS = ("path", "pred", "class", "confidence", "logp", "gradnorm", "ood_score", "ood")

    def add(self, names: list[str], out: dict) -> None:
        for j, name in enumerate(names):
            pred = int(out["pred"][j])
            self.rows.append({"path": name, "pred": pred, "class": self.classes[pred],
                              "confidence": float(out["confidence"][j]), "logp": float(out["logp"][j]),
                              "gradnorm": float(out["gradnorm"][j]), "ood_score": float(out["ood_score"][j]),
                              "ood": bool(out["ood"][j])})

    @property
    def n_ood(self) -> int:
        return sum(r["ood"] for r in self.rows)

    def write(self, path: Path) -> Path:
        """``.csv`` (the columns above) or ``.json`` (rows, failures, the detector and threshold used)."""
        import csv

        if path.suffix.lower() == ".json":
            text = json.dumps({"score": self.score, "tpr": self.tpr, "threshold": self.threshold, "rows": self.rows,
                               "failures": [{"path": p, "error": e} for p, e in self.failures]}, indent=1) + "\n"
        else:
            buf = io.StringIO(newline="")
            w = csv.DictWriter(buf, fieldnames=self.COLUMNS)
            w.writeheader()
            w.writerows(self.rows)
            text = buf.getvalue()
        return write_atomic(path, text)


# ------------------------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------------------------
def load(path: str | Path, device: str = "auto", trust_code: bool = False) -> Predictor:
    """A trained JEM from a run directory (``jem train``) or an exported model folder (``jem export``), ready to
    use: eval mode, on ``device``. A model that is user code (a factory) loads only with ``trust_code=True``."""
    path = Path(path).expanduser()
    if (path / MODEL_CARD).is_file():
        return _load_export(path, device, trust_code)
    if (path / "config.json").is_file():
        run = load_run(path, device, trust_code=trust_code)
        return Predictor(run.jem, list(run.data.classes), tuple(run.data.shape), run.run_dir, run.device, run=run)
    raise FileNotFoundError(f"{path} is neither a run directory (config.json) nor an exported model ({MODEL_CARD})")


def read_card(path: Path) -> dict:
    """``model.json``, checked field by field: a one-line CheckpointError naming what is wrong."""
    card_path = path / MODEL_CARD
    try:
        if card_path.stat().st_size > 50_000_000:
            raise ValueError("larger than 50 MB")
        card = json.loads(card_path.read_text())
    except (OSError, ValueError, RecursionError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{card_path}: not a jemtorch model card ({type(e).__name__}: {str(e)[:100]})") from None
    bad = lambda what: CheckpointError(f"{card_path}: not a jemtorch model card ({what})")
    if not isinstance(card, dict):
        raise bad(f"a JSON {type(card).__name__}, not an object")
    if card.get("format") != CARD_FORMAT:
        raise bad(f"format {str(card.get('format'))[:40]!r}, expected {CARD_FORMAT!r}")
    arch, classes, shape = card.get("architecture"), card.get("classes"), card.get("input_shape")
    if not isinstance(arch, dict) or not isinstance(arch.get("model"), str) or not arch["model"]:
        raise bad("architecture.model must be a model name such as cnn-16")
    if arch.get("norm") not in (None, "none", "batch", "instance", "layer"):
        raise bad(f"architecture.norm must be none, batch, instance or layer, got {str(arch.get('norm'))[:40]!r}")
    dropout = arch.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise bad(f"architecture.dropout must be a number in [0, 1), got {str(dropout)[:40]!r}")
    if not isinstance(classes, list) or not 1 <= len(classes) <= 100_000 or not all(isinstance(c, str) for c in classes):
        raise bad("classes must be a list of class names")
    if (not isinstance(shape, list) or len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                  for v in shape)
            or shape[0] not in (1, 3) or not all(1 <= v <= 4096 for v in shape[1:])):
        raise bad("input_shape must be [channels (1 or 3), height, width] with sides in 1..4096")
    return card


def inside(folder: Path, name, what: str) -> Path:
    """``folder/name`` when ``name`` is a plain file name inside ``folder`` (no absolute path, no ``..``, no link
    out of it); else a one-line CheckpointError."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{folder / MODEL_CARD}: {what} {str(name)[:80]!r} must be a file inside the export folder")
    p = folder / name
    if not p.resolve().is_relative_to(folder.resolve()):
        raise CheckpointError(f"{folder / MODEL_CARD}: {what} {name!r} leads out of the export folder")
    return p


def _load_export(path: Path, device: str, trust_code: bool) -> Predictor:
    from safetensors.torch import load_file

    card = read_card(path)
    arch, classes, shape = card["architecture"], list(card["classes"]), tuple(card["input_shape"])
    weights_path = inside(path, card.get("weights", WEIGHTS), "weights")
    sha = card.get("weights_sha256")
    if sha is not None and (not weights_path.is_file() or file_digest(weights_path, "sha256") != sha):
        raise CheckpointError(f"{weights_path} does not match the SHA-256 in {path / MODEL_CARD} (changed or damaged)")
    dev = pick_device(device)
    model = create_model(model_as_written(arch["model"], card.get("jemtorch_version")), in_channels=shape[0],
                         num_classes=len(classes), norm=arch.get("norm"), dropout=float(arch.get("dropout", 0.0)),
                         trust_code=trust_code)
    try:
        state = load_file(str(weights_path))
    except Exception as e:  # missing, truncated or not a safetensors file
        raise CheckpointError(f"cannot load {weights_path}: {type(e).__name__}: {str(e)[:200]}") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{weights_path}: the weights are not finite ({', '.join(bad[:3])}: NaN or inf); nothing "
                              f"can be scored with them")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{weights_path}: weights do not match the card's architecture: "
                              f"{str(e).splitlines()[0]}") from None
    check_logits(model, arch["model"], shape, len(classes))
    jem = JEM(model).to(dev).eval()
    cal = OODCalibration.from_dict(card["ood"], str(path / MODEL_CARD)) if card.get("ood") else None
    dets = _export_detectors(path, card, sha)
    if cal is not None and dets is not None:
        cal.quantiles = {k: v for k, v in cal.quantiles.items() if k in dets.names or k in OWN}
    return Predictor(jem, classes, shape, path, dev, card=card, calibration_=cal, detectors_=dets)


def _export_detectors(path: Path, card: dict, weights_sha: Optional[str]) -> Optional[FittedDetectors]:
    """The detectors an export brings (checked against the card's SHA-256); None for an export without them."""
    entry = card.get("detectors")
    if not isinstance(entry, dict):
        return None
    f = inside(path, entry.get("file", DETECTORS_FILE), "detectors")
    if not f.is_file() or file_digest(f, "sha256") != entry.get("sha256"):
        raise CheckpointError(f"{f} does not match the SHA-256 in {path / MODEL_CARD} (missing, changed or damaged)")
    dets = FittedDetectors.load(f, weights_sha)
    if dets is None:
        raise CheckpointError(f"{f} was fitted to other weights than {path / WEIGHTS}")
    return dets


# ------------------------------------------------------------------------------------------------------------------
# exporting
# ------------------------------------------------------------------------------------------------------------------
def export(run_dir: str | Path, out: str | Path, onnx: bool = False, overwrite: bool = False, device: str = "cpu",
           trust_code: bool = False) -> dict:
    """Write ``out/model.safetensors`` (the run's best-validation weights), ``out/detectors.safetensors`` (the
    detectors fitted on its training split) and ``out/model.json`` (the model card), plus ``out/model.onnx`` (the
    classifier: images → logits) with ``onnx=True``. Everything is checked before anything is written. Returns the
    card."""
    from safetensors.torch import save_file

    out = Path(out)
    check_export_folder(out, overwrite)
    if onnx and not _onnx_available():
        raise ValueError("--onnx needs the onnx package: pip install onnx onnxscript (or jemtorch[onnx])")
    pred = load(run_dir, device, trust_code)
    if pred.run is None:
        raise ValueError(f"{run_dir} is already an export; export from a run directory")
    cal, dets, cfg = pred.calibration, pred.detectors, pred.run.cfg
    summary = RunDir(run_dir).read_json(SUMMARY)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in pred.jem.f.state_dict().items()}
    tmp = out / f".{WEIGHTS}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS)
    sha = file_digest(out / WEIGHTS, "sha256")
    dets.save(out / DETECTORS_FILE, sha)
    card = {
        "format": CARD_FORMAT,
        "jemtorch_version": __version__,
        "architecture": {"model": cfg.model, "norm": cfg.norm, "dropout": cfg.dropout},
        "classes": pred.classes,
        "input_shape": list(pred.input_shape),
        "scaling": SCALING,
        "dataset": cfg.dataset,
        "recipe": cfg.recipe,
        "p_x_weight": cfg.p_x_weight,
        "training": {k: summary.get(k) for k in ("test_accuracy", "test_nll", "best_val_accuracy", "iterations",
                                                  "epochs", "train_seconds", "rollbacks", "torch", "device")},
        "weights": WEIGHTS,
        "weights_sha256": sha,
        "detectors": {"file": DETECTORS_FILE, "sha256": file_digest(out / DETECTORS_FILE, "sha256"),
                      "names": list(dets.names), "fitted_on": dets.info.get("fitted_on")},
        "ood": cal.to_dict(),
        "ood_default": f"flag images whose {cal.score} score is below calibration.threshold(tpr)",
    }
    if onnx:
        card["onnx"] = export_onnx(pred, out / ONNX_FILE)
    else:
        for name in (ONNX_FILE, ONNX_FILE + ".data"):  # never leave a stale ONNX file beside new weights
            (out / name).unlink(missing_ok=True)
    write_atomic(out / MODEL_CARD, json.dumps(card, indent=1) + "\n")
    for note in pred.notices:
        print(f"jem export: {note}", file=sys.stderr)
    return card


def check_export_folder(out: Path, overwrite: bool) -> None:
    """--out must be new, empty, or an earlier export (with --overwrite); never a link or a folder of other files."""
    ours = {MODEL_CARD, WEIGHTS, DETECTORS_FILE, ONNX_FILE, ONNX_FILE + ".data"}
    if out.is_symlink():
        raise ValueError(f"--out {out} is a symbolic link; give the folder itself")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ours or p.is_symlink())
        if foreign:
            raise ValueError(f"--out {out} holds files that are not an export ({', '.join(foreign[:3])}); "
                             f"choose an empty or new folder")
        if not overwrite:
            raise ValueError(f"--out {out} already holds an export; pass --overwrite to replace it")


def _onnx_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnx") is not None


def export_onnx(pred: Predictor, path: Path) -> str:
    """The classifier as ONNX (input ``images``: float (N, C, H, W) in [−1, 1]; output ``logits``), dynamic batch.

    Uses torch's ``torch.export``-based exporter when ``onnxscript`` is installed (it handles every jemtorch model),
    else the TorchScript-based one (needs only ``onnx``; it cannot export an adaptive pooling whose output size does
    not divide its input, as in the cnn models on 28×28 images)."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise ValueError("--onnx needs the onnx package: pip install onnx onnxscript (or jemtorch[onnx])")
    dynamo = importlib.util.find_spec("onnxscript") is not None
    model = pred.jem.f.cpu().eval()
    dummy = torch.zeros(2, *pred.input_shape)  # batch 2: a batch of 1 would be specialised away
    tmp_dir = path.parent / f".{path.name}.tmp"  # big models get an external-data file named after the .onnx file
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    tmp = tmp_dir / path.name
    if dynamo:
        kwargs: dict = {"dynamo": True, "dynamic_shapes": ({0: torch.export.Dim("batch")},)}
    else:
        legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
        kwargs = {"dynamic_axes": {"images": {0: "batch"}, "logits": {0: "batch"}}, **legacy}
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (dummy,), str(tmp), input_names=["images"], output_names=["logits"], **kwargs)
    except Exception as e:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        hint = "" if dynamo else " (installing onnxscript enables torch's newer exporter)"
        raise ValueError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}{hint}") from None
    finally:
        pred.jem.to(pred.device)
    names = sorted(p.name for p in tmp_dir.iterdir())
    for name in names:
        (tmp_dir / name).replace(path.parent / name)
    tmp_dir.rmdir()
    return ", ".join(names)
