"""Every jemtorch detector against pytorch-ood 0.4 on the same features, in a process of its own.

A CUDA build of torchvision beside CPU torch breaks on import (its two compiled operators do not exist) and, once
installed, breaks the libraries that import it if present (torchmetrics): so pytorch-ood lives outside the test
environment (``pip install --no-deps --target .ood pytorch-ood torchvision``, the README's test command) and is
imported here alone, after defining the schemas of ``torchvision::nms`` and ``torchvision::qnms``. Where pytorch-ood
imports directly (``pip install "jemtorch[ood]"`` with a matching torchvision) no schema is needed.

Prints one line per detector (max |difference|, scale) and exits 1 on a mismatch beyond 1e-4 of the scores' scale
(pytorch-ood computes in float32), 3 when pytorch-ood does not import.
"""
import sys

import numpy as np
import torch


def import_pytorch_ood():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return None
    except RuntimeError:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
        import_pytorch_ood.lib = lib  # the definitions live as long as the Library object
    try:
        import pytorch_ood.detector as det
    except Exception:
        return None
    return det


def pytorch_ood_scores(det, name, logits, z, y, z_test, head, k):
    """pytorch-ood's outlier scores for ``z_test`` (fitted on ``z``, ``y``)."""
    w, b = head.weight.detach(), head.bias.detach()
    if name == "logp":
        return det.EnergyBased.score(logits)
    if name == "maxprob":
        return det.MaxSoftmax.score(logits)
    if name == "maxlogit":
        return det.MaxLogit.score(logits)
    if name == "mahalanobis":
        return det.Mahalanobis(None).fit_features(z, y).predict_features(z_test)
    if name == "vim":  # haoqiwang/vim's residual rule for features under 768 dimensions, as jemtorch applies it
        return det.ViM(None, d=z.shape[1] // 2, w=w, b=b).fit_features(z, y).predict_features(z_test)
    if name == "knn":
        return det.KNN(None, k=k).fit_features(z, y).predict_features(z_test)
    react = det.ReAct(backbone=None, head=lambda f: f @ w.T + b)
    return react.fit_feature_maps(z, y).predict_feature_maps(z_test)


def main() -> int:
    det = import_pytorch_ood()
    if det is None:
        print("pytorch-ood does not import here")
        return 3
    from jemtorch.detectors import DETECTORS, Outputs

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n, d, c = 600, 24, 4
    y = torch.arange(n) % c
    centres = 3 * torch.randn(c, d, generator=g)
    z = torch.randn(n, d, generator=g) + centres[y]
    z_test = torch.cat([torch.randn(200, d, generator=g) + centres[torch.arange(200) % c], 5 * torch.randn(100, d, generator=g)])
    head = torch.nn.Linear(d, c)
    torch.nn.init.normal_(head.weight, generator=g)
    logits = head(z_test).detach()
    failed = 0
    for name in ("logp", "maxprob", "maxlogit", "mahalanobis", "vim", "knn", "react"):
        ours_det = DETECTORS[name]()
        ours_det.fit(Outputs(head(z).detach(), z), y, head)
        ours_det.load_state_dict(ours_det.state_dict())  # as FittedDetectors scores: from the stored tensors
        ours = np.asarray(ours_det.score(Outputs(logits, z_test)), np.float64)
        k = int(getattr(ours_det, "k", 1))
        theirs = pytorch_ood_scores(det, name, logits, z, y, z_test, head, k)
        theirs = -np.asarray(theirs.detach().double())  # pytorch-ood: outlier scores; jemtorch: in-distribution
        scale = np.abs(theirs).max()
        diff = np.abs(ours - theirs).max()
        ok = diff <= 1e-4 * scale + 1e-6
        failed += not ok
        print(f"{name:12s} max |jemtorch - pytorch-ood| {diff:.2e} (scale {scale:.3g}) {'ok' if ok else 'MISMATCH'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
