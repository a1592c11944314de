"""OOD detectors: the JEM's own scores and the field's post-hoc detectors, each a small object with ``fit`` and
``score`` (pytorch-ood's shape). Every score is *higher = more in-distribution*.

| name        | score                                                            | fitted on the training split    |
|-------------|------------------------------------------------------------------|---------------------------------|
| logp        | log p(x) = LogSumExp_y f(x)[y]; for a classifier the Energy score | —                               |
| maxprob     | max_y p(y|x), MSP (Hendrycks & Gimpel 2017)                       | —                               |
| gradnorm    | −‖∂ log p(x)/∂x‖₂ (Grathwohl et al. 2020)                          | —                               |
| typicality  | log density of (log p(x), log ‖∇ₓ log p(x)‖) (DoSE-style)        | a kernel density of the pairs   |
| complexity  | log density of (log p(x), log ‖∇ₓ log p(x)‖, length L(x))         | a kernel density of the triples |
| ascent      | log density of (log p(x), L(x), log rise of log p(x) over         | a kernel density of the triples |
|             | 10 capped gradient-ascent steps from the image)                   |                                 |
| maxlogit    | max_y f(x)[y] (Hendrycks et al. 2022)                             | —                               |
| mahalanobis | −½ min_c (z − μ_c)ᵀ Σ⁻¹ (z − μ_c) (Lee et al. 2018)               | class means, shared covariance  |
| vim         | LogSumExp(Wz + b) − α‖(z − u) R‖ (Wang et al. 2022)              | residual space R, origin u, α   |
| knn         | −‖ẑ − ẑ_(k)‖, ẑ = z/‖z‖ (Sun et al. 2022)                          | a bank of normalised features   |
| react       | LogSumExp(W min(z, c) + b) (Sun et al. 2021)                      | clip c: 90th percentile of z    |
| length      | log density of L(x) alone: no model (Serra et al. 2020)          | a kernel density of the lengths |

L(x) is the image's length as a lossless WebP, bits per dimension (``CODEC``; fits stored before ``FIT_VERSION`` 5
used PNG and keep it: ``FittedDetectors.info["codec"]``). ``z`` are the features that enter the classifier's head,
its last ``nn.Linear`` (a model can name another head in a ``jemtorch_head`` attribute: the name of a submodule).
The first six are the JEM's own scores (``OWN``): they read the energy model and its input gradient (typicality fits
their joint density on the training split; complexity adds the image's compressed length, the input complexity that
confounds every likelihood; ascent replaces the gradient's norm by how far log p(x) climbs along a short chain from
the image: whether the image sits at a mode of the density). ``length`` (formerly ``png``) is that length alone, a
reference without any model: a JEM's score that adds the length wins only where it beats the length alone. The
post-hoc definitions follow pytorch-ood 0.4 (``pytorch_ood.detector``; for Mahalanobis its covariance, the sum of the centred
outer products plus 1e-6·I) and the detectors' official code (ViM's residual dimension: haoqiwang/vim
``benchmark.py``; for features of lower rank than that, half their rank, said in ``info["notes"]``). jemtorch computes
them itself, so that the core never needs torchvision; tests/ood_agreement.py checks every score against
pytorch-ood's on the same features, to 1e-4 of their scale, where pytorch-ood imports (``pip install "jemtorch[ood]"``;
the README's test command installs it beside the environment).

``FittedDetectors`` fits all of them on a run's training split (never on test or OOD images), keeps them per weights
(``RUN/detectors.safetensors``, keyed by the weights' SHA-256) and scores images; ``OODCalibration`` holds each score's
quantiles on validation images, from which ``jem score`` takes its OOD thresholds.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, replace_atomic
from .data import to_uint8
from .energy import JEM
from .sampler import capped_step, frozen

# the JEM's own scores: its energy, its classifier, its input gradient, and the typicality of energy and gradient
OWN = ("logp", "maxprob", "gradnorm", "typicality", "complexity", "ascent")
N_FIT = 10_000  # training images the detectors are fitted on (at most): the and common practice's number
FIT_VERSION = 5  # raised whenever a detector's fit changes: stored fits of another version are fitted again
ASCENT_STEPS = 10  # steps the rise is read after: of 1-20 best or tied on MNIST, 2 seeds of 3 (docs/results/density.md)
ASCENT_CAP = 0.02  # RMS move per pixel and step ([−1, 1] pixels): configs/fashion-mnist-density.toml's sgld_step_cap
# the compressor that measures input complexity: lossless WebP at libwebp's default effort. Serrà et al. 2020: the
# better the compressor, the better the score; against PNG it lifts ascent's MNIST AUROC on every Fashion-MNIST run
# probed, at PNG's cost (benchmarks/probe_complexity.py; docs/results/density.md, "A better compressor")
CODEC = "webp"
# how Pillow saves each codec's lossless image (method 4: libwebp's default effort, about PNG's cost)
CODEC_SAVE = {"webp": dict(format="WEBP", lossless=True, quality=100, method=4), "png": dict(format="PNG", optimize=True)}
KNN_K_FULL = 50  # Sun et al. 2022: k = 50 for CIFAR-10's 50 000 training images, scaled with the share used


class DetectorError(ValueError):
    """A detector that cannot be fitted or used; the message names it and the cause."""


# ------------------------------------------------------------------------------------------------------------------
# what a model gives the detectors
# ------------------------------------------------------------------------------------------------------------------
def classifier_head(model: nn.Module) -> nn.Linear:
    """The layer whose input are the features: ``model.jemtorch_head`` (a submodule name) if set, else the last
    ``nn.Linear`` in registration order."""
    name = getattr(model, "jemtorch_head", None)
    if isinstance(name, str):
        head = dict(model.named_modules()).get(name)
        if not isinstance(head, nn.Linear):
            raise DetectorError(f"the model's jemtorch_head {name!r} is not an nn.Linear submodule")
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise DetectorError("the model has no nn.Linear head to take features from (name one in model.jemtorch_head)")
    return linears[-1]


@dataclass
class Outputs:
    """A model's outputs for a set of images (CPU tensors): logits (N, C), head features (N, D), and when asked for
    −‖∇ₓ log p(x)‖ (N,), the images' compressed length in bits per dimension (N,; ``code_bits``) and the rise of
    log p(x) along ``ascent_rise``'s chain (N,)."""

    logits: torch.Tensor
    features: torch.Tensor
    gradnorm: Optional[torch.Tensor] = None
    complexity: Optional[torch.Tensor] = None
    rise: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.logits)


def encoded_bits(x: torch.Tensor, **save) -> torch.Tensor:
    """Each float image's (N, C, H, W) in [−1, 1] length when its uint8 pixels are saved by Pillow with ``save``
    (``format`` and its options), in bits per dimension (N,)."""
    from PIL import Image

    u = to_uint8(x.detach().float().cpu()).permute(0, 2, 3, 1).numpy()
    bits = []
    for im in u:
        buf = io.BytesIO()
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(buf, **save)
        bits.append(8.0 * buf.tell() / im.size)
    return torch.tensor(bits, dtype=torch.float64)


def code_bits(x: torch.Tensor, codec: str = CODEC) -> torch.Tensor:
    """Input complexity: each float image's (N, C, H, W) length under a lossless ``codec`` — ``webp`` (lossless WebP,
    quality 100, method 4: libwebp's default effort) or ``png`` (``png_bits``) — in bits per dimension (N,)."""
    if codec == "png":
        return png_bits(x)
    if codec != "webp":
        raise DetectorError(f"unknown image codec {codec!r} for the input complexity (webp or png)")
    from PIL import features

    if not features.check("webp"):
        raise DetectorError("the input complexity needs Pillow built with WebP (pip install --upgrade pillow)")
    return encoded_bits(x, **CODEC_SAVE["webp"])


def png_bits(x: torch.Tensor) -> torch.Tensor:
    """Input complexity: the length of each float image (N, C, H, W) in [−1, 1] as a lossless PNG (its uint8 pixels,
    zlib level 9 with PNG's filters), in bits per dimension. Serra et al. 2020 ("Input complexity and
    out-of-distribution detection with likelihood-based generative models", ICLR) use such a compressor's length as a
    universal model against which a likelihood is compared: simple images (flat, sparse strokes) are short and get
    high likelihoods from every density model, noise is long."""
    return encoded_bits(x, **CODEC_SAVE["png"])


def ascent_rise(jem: JEM, x: torch.Tensor, steps: int = ASCENT_STEPS, cap: float = ASCENT_CAP) -> torch.Tensor:
    """How far log p(x) climbs along ``steps`` noise-free gradient-ascent steps from each image, x ← x + α∇ₓ log p(x)
    with α = 1 (the JEM's chain step, Grathwohl et al. 2020) lowered per image so that the move has an RMS per pixel
    of at most ``cap``: log p(x_steps) − log p(x), shape (N,). An image at a mode of the density barely climbs; one on
    a slope — a digit under a garments density, whose log p(x) alone may be as high as a garment's — climbs far.
    Each image moves alone (per-image step, eval mode), so its rise does not depend on the batch; no pixel clamp."""
    return ascent_path(jem, x, (steps,), cap)[:, 0]


def ascent_path(jem: JEM, x: torch.Tensor, lengths: Sequence[int], cap: float = ASCENT_CAP,
                start: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """``ascent_rise`` after each of ``lengths`` steps of one chain, shape (N, len(lengths)), float64. ``start``:
    (log p(x), ∇ₓ log p(x)) at ``x`` when the caller has them already (``model_outputs``' gradient pass): the first
    forward and backward are not repeated."""
    xk, rises = x.detach().clone().requires_grad_(True), []
    with torch.enable_grad():
        for t in range(max(lengths) + 1):
            if t == 0 and start is not None:
                lp, g = start[0].detach(), start[1]
            else:
                lp = jem(xk).logsumexp(1)
            if t == 0:
                lp0 = lp.detach()
            if t in lengths:
                rises.append((lp.detach() - lp0).double())
            if t == max(lengths):
                break
            if t > 0 or start is None:
                (g,) = torch.autograd.grad(lp.sum(), xk)
            with torch.no_grad():
                xk.add_(g * capped_step(1.0, cap, g, per_sample=True))  # the chain's step, α = 1, per image
    return torch.stack(rises, 1)


def model_outputs(jem: JEM, x: torch.Tensor, batch_size: int = 250, device=None, grad: bool = True,
                  progress: bool = False, desc: str = "scores", complexity: bool = False,
                  ascent: bool = False, codec: str = CODEC) -> Outputs:
    """Logits, head features, (``grad``) the input-gradient norm of log p(x), (``complexity``) the images' lengths
    under ``codec`` in bits per dimension (``code_bits``) and (``ascent``) ``ascent_rise`` for float images ``x``, in
    eval mode (each image scored alone: no batch statistics)."""
    device = device or next(jem.parameters()).device
    head = classifier_head(jem.f)
    feats: list[torch.Tensor] = []
    recording = [True]  # off during the ascent: its forward passes are not the images' features

    def record(mod, inp):
        if recording[0]:
            feats.append(inp[0].detach().flatten(1).float().cpu())

    hook = head.register_forward_pre_hook(record)
    logits, norms, rises = [], [], []
    backward = grad or ascent
    try:
        with frozen(jem), torch.set_grad_enabled(backward):
            for i in tqdm(range(0, len(x), batch_size), desc=desc, disable=not progress, leave=False):
                xb = x[i : i + batch_size].to(device).requires_grad_(backward)
                out = jem(xb)
                if backward:  # samples are independent in eval mode: per-sample gradients
                    lp = out.logsumexp(1)
                    (g,) = torch.autograd.grad(lp.sum(), xb)
                    if grad:
                        norms.append(g.flatten(1).norm(dim=1).cpu())
                logits.append(out.detach().float().cpu())
                if ascent:  # the chain starts from this pass's log p(x) and gradient
                    recording[0] = False
                    rises.append(ascent_path(jem, xb, (ASCENT_STEPS,), start=(lp, g))[:, 0].cpu())
                    recording[0] = True
    finally:
        hook.remove()
    res = Outputs(torch.cat(logits), torch.cat(feats), -torch.cat(norms) if grad else None,
                  code_bits(x, codec) if complexity else None, torch.cat(rises) if ascent else None)
    if not (torch.isfinite(res.logits).all() and torch.isfinite(res.features).all()):
        raise DetectorError("the model's logits or features are not finite on these images (NaN/inf weights?)")
    return res


# ------------------------------------------------------------------------------------------------------------------
# detectors
# ------------------------------------------------------------------------------------------------------------------
class Detector:
    """Base: ``fit`` (on the training split's outputs, labels and the head), ``score`` (higher = in-distribution),
    the fitted tensors as ``state_dict``."""

    name = ""
    label = ""  # how tables name it
    needs_grad = False
    needs_complexity = False  # reads Outputs.complexity (the compressed length, bits/dim)
    needs_ascent = False  # reads Outputs.rise (ascent_rise: ASCENT_STEPS forward and backward passes more per image)
    model_free = False  # reads no model output: a reference, never the default OOD flag
    note = ""  # what a regularised fit changed, said in the reports

    def fit(self, out: Outputs, y: torch.Tensor, head: nn.Linear) -> None: ...

    def score(self, out: Outputs) -> np.ndarray:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


class Logp(Detector):
    name, label = "logp", "log p(x) (Energy)"

    def score(self, out):
        return out.logits.double().logsumexp(1).numpy()


class MaxProb(Detector):
    name, label = "maxprob", "max p(y|x) (MSP)"

    def score(self, out):
        return out.logits.double().softmax(1).max(1).values.numpy()


class GradNorm(Detector):
    name, label, needs_grad = "gradnorm", "−‖∇x log p(x)‖", True

    def score(self, out):
        if out.gradnorm is None:
            raise DetectorError("gradnorm needs the input gradient (model_outputs(grad=True))")
        return out.gradnorm.double().numpy()


class MaxLogit(Detector):
    name, label = "maxlogit", "MaxLogit"

    def score(self, out):
        return out.logits.double().max(1).values.numpy()


class Mahalanobis(Detector):
    """Class means and one shared covariance of the features (pytorch-ood 0.4: the sum of the centred outer products
    over all classes, plus 1e-6·I; its inverse in float64 here)."""

    name, label = "mahalanobis", "Mahalanobis"

    def fit(self, out, y, head):
        z = out.features.double()
        classes = int(y.max()) + 1
        counts = torch.bincount(y, minlength=classes)
        if (counts < 2).any():
            raise DetectorError(f"mahalanobis: class {int((counts < 2).nonzero()[0])} has fewer than 2 training "
                                f"images to fit its mean on")
        self.mu = torch.stack([z[y == c].mean(0) for c in range(classes)])
        centred = z - self.mu[y]
        cov = centred.T @ centred + 1e-6 * torch.eye(z.shape[1], dtype=torch.float64)
        self.precision = torch.linalg.inv(cov)
        if not torch.isfinite(self.precision).all():
            raise DetectorError("mahalanobis: the feature covariance cannot be inverted")

    def score(self, out):
        z = out.features.double()
        zp = z @ self.precision  # (z−μ)ᵀP(z−μ) = zᵀPz − 2 zᵀPμ + μᵀPμ: one D×D product per image, not one per class
        d2 = (zp * z).sum(1, keepdim=True) - 2 * zp @ self.mu.T + ((self.mu @ self.precision) * self.mu).sum(1)
        return (-0.5 * d2.min(1).values).numpy()

    def state_dict(self):
        return {"mu": self.mu.float(), "precision": self.precision.float()}

    def load_state_dict(self, state):
        self.mu, self.precision = state["mu"].double(), state["precision"].double()


class ViM(Detector):
    """Virtual-logit matching: the features' residual outside the principal space of the training features (centred
    at u = −W⁺b), scaled by α, against the energy. Residual dimension as haoqiwang/vim benchmark.py: principal space
    of 1000 dims for D ≥ 2048, 512 for D ≥ 768, else D/2."""

    name, label = "vim", "ViM"

    def fit(self, out, y, head):
        w, b = head.weight.detach().double().cpu(), head.bias.detach().double().cpu()
        z = out.features.double()
        dim = z.shape[1]
        principal = 1000 if dim >= 2048 else 512 if dim >= 768 else dim // 2
        if principal < 1:
            raise DetectorError(f"vim: {dim}-dimensional features leave no principal space")
        self.u = -(torch.linalg.pinv(w) @ b)
        x = z - self.u
        vals, vecs = torch.linalg.eigh(x.T @ x / len(x))  # ascending eigenvalues
        rank = int((vals > 1e-9 * vals[-1]).sum())
        if rank <= principal:  # the residual would hold no training variance at all: α would be infinite
            self.note = (f"vim: the {dim}-dimensional features have rank {rank}; principal space {max(1, rank // 2)} "
                         f"dimensions instead of {principal}")
            principal = max(1, rank // 2)
        self.residual = vecs[:, : dim - principal].contiguous()
        logits = z @ w.T + b
        self.alpha = torch.tensor(float(logits.max(1).values.mean() / (x @ self.residual).norm(dim=1).mean()))
        self.w, self.b = w, b

    def score(self, out):
        z = out.features.double()
        energy = (z @ self.w.T + self.b).logsumexp(1)
        return (energy - self.alpha * ((z - self.u) @ self.residual).norm(dim=1)).numpy()

    def state_dict(self):
        return {"u": self.u.float(), "residual": self.residual.float(), "alpha": self.alpha.float(), "w": self.w.float(),
                "b": self.b.float()}

    def load_state_dict(self, state):
        self.u, self.residual, self.alpha = state["u"].double(), state["residual"].double(), state["alpha"].double()
        self.w, self.b = state["w"].double(), state["b"].double()


class KNN(Detector):
    """Distance of the normalised features to the k-th nearest normalised training feature (cosine geometry). k: the
    paper's 50 for CIFAR-10's 50 000 training images, scaled with the number fitted on (the paper scales k the same
    way for ImageNet subsets)."""

    name, label = "knn", "KNN"

    def fit(self, out, y, head):
        self.bank = normalise(out.features)
        self.k = torch.tensor(max(1, round(KNN_K_FULL * len(self.bank) / 50_000)))

    def score(self, out):
        bank, k, q = self.bank.float(), int(self.k), normalise(out.features)
        bank_sq = bank.pow(2).sum(1)
        dist = []
        for i in range(0, len(q), 1000):
            qi = q[i : i + 1000]
            d2 = (qi.pow(2).sum(1, keepdim=True) + bank_sq - 2 * qi @ bank.T).clamp(min=0)
            dist.append(d2.topk(k, dim=1, largest=False).values[:, -1].sqrt())
        return (-torch.cat(dist)).double().numpy()

    def state_dict(self):
        return {"bank": self.bank, "k": self.k}

    def load_state_dict(self, state):
        self.bank, self.k = state["bank"], state["k"]


def normalise(z: torch.Tensor) -> torch.Tensor:
    return z.float() / z.float().norm(dim=1, keepdim=True).clamp(min=1e-12)


class ReAct(Detector):
    """The energy of the head applied to features clipped at c, their 90th percentile on the training split."""

    name, label = "react", "ReAct"

    def fit(self, out, y, head):
        self.clip = torch.tensor(float(np.percentile(out.features.numpy(), 90)))
        self.w, self.b = head.weight.detach().double().cpu(), head.bias.detach().double().cpu()

    def score(self, out):
        z = out.features.double().clamp(max=float(self.clip))
        return (z @ self.w.T + self.b).logsumexp(1).numpy()

    def state_dict(self):
        return {"clip": self.clip.float(), "w": self.w.float(), "b": self.b.float()}

    def load_state_dict(self, state):
        self.clip, self.w, self.b = state["clip"], state["w"].double(), state["b"].double()


class Typicality(Detector):
    """Is an image *typical* of the training split for this energy model? A density of the pair (log p(x),
    log ‖∇ₓ log p(x)‖) fitted on the training images (a Gaussian kernel density of the standardised pairs, Scott's
    bandwidth), the score its log density. Likelihood alone ranks inputs that are *too* likely (flat images) as
    in-distribution; the typical set has both a likelihood and a local shape of the density (Nalisnick et al. 2019,
    "Detecting out-of-distribution inputs to deep generative models using typicality"; Morningstar et al. 2021,
    "Density of states estimation"). Built from the energy model's own two quantities: the JEM's own score, as log
    p(x) is; applied to a classifier it is a post-hoc detector like the others."""

    name, label, needs_grad = "typicality", "typicality of (log p(x), ‖∇x log p(x)‖)", True
    MAX_POINTS = N_FIT  # kernel centres kept: every fit row (4 000 of them let through 2x the digits: density.md)

    def pairs(self, out: Outputs) -> torch.Tensor:
        if out.gradnorm is None:
            raise DetectorError(f"{self.name} needs the input gradient (model_outputs(grad=True))")
        return torch.stack([out.logits.double().logsumexp(1), (-out.gradnorm.double()).clamp(min=1e-12).log()], 1)

    def fit(self, out, y, head):
        p = self.pairs(out)
        if len(p) > self.MAX_POINTS:
            p = p[torch.randperm(len(p), generator=torch.Generator().manual_seed(0))[: self.MAX_POINTS]]
        self.mean, self.std = p.mean(0), p.std(0).clamp(min=1e-6)
        self.points = (p - self.mean) / self.std
        self.bandwidth = torch.tensor(float(len(p)) ** (-1 / (p.shape[1] + 4)))  # Scott's rule, unit variances

    def score(self, out):
        q = (self.pairs(out) - self.mean) / self.std
        h, pts = float(self.bandwidth), self.points
        logk = [(-((qi[:, None, :] - pts[None]) ** 2).sum(-1) / (2 * h * h)).logsumexp(1) for qi in q.split(250)]
        return (torch.cat(logk) - np.log(len(pts)) - pts.shape[1] / 2 * np.log(2 * np.pi * h * h)).numpy()

    def state_dict(self):
        return {"mean": self.mean.float(), "std": self.std.float(), "points": self.points.float(),
                "bandwidth": self.bandwidth.float()}

    def load_state_dict(self, state):
        self.mean, self.std, self.points = state["mean"].double(), state["std"].double(), state["points"].double()
        self.bandwidth = state["bandwidth"].double()


class Complexity(Typicality):
    """Typicality with the input's complexity: the density of (log p(x), log ‖∇ₓ log p(x)‖, L(x)) on the training
    split, L the image's compressed length (``code_bits``). A likelihood is confounded by how simple an image is (Serra
    et al. 2020): flat images and sparse digits compress short and are likely under any density, noise is long and
    unlikely. Serra et al. subtract the compressor's length from the model's; an energy model's log p(x) has no known
    scale (its normaliser and its sampler's temperature are unknown), so the triple's density, fitted on the training
    split, learns how likelihood, its gradient and complexity go together for in-distribution images and flags images
    whose likelihood does not fit their complexity. ``length`` (the length alone) is the reference it must beat."""

    name, label, needs_complexity = "complexity", "typicality of (log p(x), ‖∇x log p(x)‖, compressed length)", True

    def pairs(self, out: Outputs) -> torch.Tensor:
        if out.complexity is None:
            raise DetectorError("complexity needs the images' lengths (model_outputs(complexity=True))")
        return torch.cat([super().pairs(out), out.complexity.double()[:, None]], 1)


class Ascent(Typicality):
    """Does the image sit at a mode of the density? The density of (log p(x), L(x), log of ``ascent_rise``)
    on the training split. A JEM trained with short chains learns an energy whose training images sit near its local
    maxima: ten small ascent steps from one barely raise log p(x), while from an image of another domain — MNIST
    digits under a Fashion-MNIST JEM, rated as likely as garments by log p(x) alone — they climb far. It is the
    gradient norm's non-local counterpart (the norm is the first step's slope; the rise integrates the path), set
    beside log p(x) and the input complexity that confounds it, as in ``complexity``. Built from the energy model and
    its input gradient: the JEM's own score; applied to a classifier, a post-hoc detector like the others. Costs
    ``ASCENT_STEPS`` forward and backward passes per image."""

    name, label, needs_complexity, needs_ascent = ("ascent", "typicality of (log p(x), compressed length, ascent rise)",
                                                   True, True)

    def pairs(self, out: Outputs) -> torch.Tensor:
        if out.rise is None or out.complexity is None:
            raise DetectorError("ascent needs the ascent rise and the images' lengths (model_outputs(ascent=True, "
                                "complexity=True))")
        return torch.stack([out.logits.double().logsumexp(1), out.complexity.double(),
                            out.rise.double().clamp(min=1e-6).log()], 1)


class Length(Typicality):
    """The density of the compressed length L(x) alone on the training split: input complexity without any model,
    the reference that tells what a score gains from the model beyond the image's compressibility (``png`` before
    ``FIT_VERSION`` 5, when the length was PNG's)."""

    name, label, needs_grad, needs_complexity, model_free = ("length", "compressed length alone (no model)", False,
                                                             True, True)

    def pairs(self, out: Outputs) -> torch.Tensor:
        if out.complexity is None:
            raise DetectorError("length needs the images' lengths (model_outputs(complexity=True))")
        return out.complexity.double()[:, None]


DETECTORS: dict[str, type[Detector]] = {d.name: d for d in (Logp, MaxProb, GradNorm, Typicality, Complexity, Ascent,
                                                            MaxLogit, Mahalanobis, ViM, KNN, ReAct, Length)}
ALIASES = {"energy": "logp", "msp": "maxprob", "png": "length"}  # png: the length's name in fits of FIT_VERSION < 5


def detector_names(spec: str) -> tuple[str, ...]:
    """``all`` or a comma-separated list (aliases: energy = logp, msp = maxprob, png = length) → detector names, the
    JEM's own scores first; a one-line DetectorError for an unknown name."""
    names = list(DETECTORS) if spec.strip() == "all" else [ALIASES.get(n.strip(), n.strip()) for n in spec.split(",")
                                                           if n.strip()]
    unknown = [n for n in names if n not in DETECTORS]
    if unknown or not names:
        raise DetectorError(f"unknown detector {unknown[0] if unknown else spec!r}; choose from all, "
                            f"{', '.join(DETECTORS)} (energy = logp, msp = maxprob, png = length)")
    return tuple(sorted(dict.fromkeys(names), key=list(DETECTORS).index))


# ------------------------------------------------------------------------------------------------------------------
# a model's fitted detectors
# ------------------------------------------------------------------------------------------------------------------
class FittedDetectors:
    """Detectors fitted on one model's training split; ``score`` gives every detector's score of images."""

    def __init__(self, detectors: dict[str, Detector], info: dict):
        self.detectors, self.info = detectors, info

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.detectors)

    @classmethod
    def fit(cls, jem: JEM, x: torch.Tensor, y: torch.Tensor, names=tuple(DETECTORS), progress: bool = False,
            where: str = "the training split") -> FittedDetectors:
        """Fit ``names`` on float images ``x`` with labels ``y`` (a run's training split)."""
        if len(x) < 2:
            raise DetectorError(f"cannot fit the detectors on {len(x)} training image(s)")
        grad = any(DETECTORS[n].needs_grad for n in names)
        cx = any(DETECTORS[n].needs_complexity for n in names)
        asc = any(DETECTORS[n].needs_ascent for n in names)
        out = model_outputs(jem, x, grad=grad, progress=progress, desc="fitting OOD detectors", complexity=cx,
                            ascent=asc, codec=CODEC)
        head = classifier_head(jem.f)
        dets = {}
        for name in names:
            det = DETECTORS[name]()
            det.fit(out, y.cpu(), head)
            det.load_state_dict(det.state_dict())  # scores from the stored precision from the start
            dets[name] = det
        notes = [d.note for d in dets.values() if d.note]
        return cls(dets, {"n_images": len(x), "fitted_on": where, "feature_dim": out.features.shape[1], "notes": notes,
                          "version": FIT_VERSION, "codec": CODEC})

    def score(self, jem: JEM, x: torch.Tensor, batch_size: int = 250, device=None, progress: bool = False,
              desc: str = "scores") -> dict[str, np.ndarray]:
        """Every detector's score of float images ``x`` (higher = more in-distribution)."""
        return self.outputs_and_scores(jem, x, batch_size, device, progress, desc)[1]

    def outputs_and_scores(self, jem: JEM, x: torch.Tensor, batch_size: int = 250, device=None, progress: bool = False,
                           desc: str = "scores") -> tuple[Outputs, dict[str, np.ndarray]]:
        grad = any(d.needs_grad for d in self.detectors.values())
        cx = any(d.needs_complexity for d in self.detectors.values())
        asc = any(d.needs_ascent for d in self.detectors.values())
        out = model_outputs(jem, x, batch_size, device, grad=grad, progress=progress, desc=desc, complexity=cx,
                            ascent=asc, codec=self.info.get("codec", "png"))  # the lengths the fit was made with
        dim = self.info.get("feature_dim")
        if dim is not None and out.features.shape[1] != dim:
            raise DetectorError(f"the detectors were fitted on {dim}-dimensional features, this model gives "
                                f"{out.features.shape[1]}: they belong to another model")
        return out, {name: det.score(out) for name, det in self.detectors.items()}

    # storage: one safetensors file, tensors per detector and the description as metadata --------------------------
    def save(self, path: Path, weights_sha256: str) -> None:
        from safetensors.torch import save_file

        tensors = {f"{n}.{k}": v.detach().cpu().contiguous() for n, d in self.detectors.items()
                   for k, v in d.state_dict().items()}
        meta = {"weights_sha256": weights_sha256, "info": json.dumps({**self.info, "detectors": list(self.detectors)})}
        replace_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: Path, weights_sha256: Optional[str] = None) -> Optional[FittedDetectors]:
        """The detectors stored at ``path``; None when absent or fitted to other weights. Unreadable: CheckpointError."""
        from safetensors import safe_open

        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            info = json.loads(meta.get("info", "{}"))
            if weights_sha256 is not None and meta.get("weights_sha256") != weights_sha256:
                return None
            dets = {}
            for name in info["detectors"]:
                det = DETECTORS[ALIASES.get(name, name)]()  # kept under its stored name (calibrations use it)
                det.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == name})
                dets[name] = det
        except Exception as e:  # a damaged or foreign file: say which
            raise CheckpointError(f"{path} is not a readable detectors file ({type(e).__name__}: {str(e)[:120]})") from None
        return cls(dets, info)
