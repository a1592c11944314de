"""The energy model: any classifier f(x) -> logits, read as a Joint Energy-based Model.

    p(x, y) ∝ exp f(x)[y]        E(x, y) = -f(x)[y]
    p(x)    ∝ Σ_y exp f(x)[y]    E(x)    = -LogSumExp_y f(x)[y]
    p(y|x)  = softmax(f(x))[y]   (unchanged: JEM is still the classifier)
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """The module in eval mode for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def in_batches(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 500,
               device: Optional[torch.device] = None) -> torch.Tensor:
    """``fn`` applied to ``x`` in chunks of ``batch_size`` (moved to ``device`` first), results concatenated."""
    outs = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        outs.append(fn(xb.to(device) if device is not None else xb))
    return torch.cat(outs)


def image_norms(d: torch.Tensor) -> torch.Tensor:
    """Each image's L2 norm, shaped to broadcast over the batch (N, 1, 1, 1) and never below 1e-12 (so ``d /
    image_norms(d)`` is a unit vector per image, and 0 for an all-zero one): VAT's and PGD's L2 steps share it."""
    return d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (d.dim() - 1))


def nonfinite_weights(module: nn.Module) -> list[str]:
    """Names of the module's floating-point weights and buffers holding a NaN or an inf (a diverged run's)."""
    return [n for n, p in module.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]


def logit_head(classifier: nn.Module, num_classes: Optional[int] = None) -> nn.Linear:
    """The classifier's last ``nn.Linear`` layer, taken to compute the logits from the last features (every network
    in the registry ends in one: ``head``). Its weights' and bias's common mode over the classes is the shift the
    network adds to every logit, which p(y|x) ignores and E(x) = −LogSumExp f(x) does not."""
    heads = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
    if not heads or (num_classes is not None and heads[-1].out_features != num_classes):
        raise ValueError(f"{type(classifier).__name__} does not end in an nn.Linear layer with one output per class "
                         "(the logits): --px-tail-grad logit-shift needs one")
    return heads[-1]


class JEM(nn.Module):
    """Wraps a classifier ``f`` (any ``nn.Module`` mapping images to logits) as an energy model.

    >>> jem = JEM(my_classifier)
    >>> jem.energy(x)          # E(x)    = -logsumexp f(x)          shape (B,)
    >>> jem.energy(x, y)       # E(x,y)  = -f(x)[y]                 shape (B,)
    >>> jem.log_p_y_given_x(x) # log softmax f(x)                   shape (B, C)
    >>> jem.log_px(x)          # unnormalised log p(x) = -E(x)      shape (B,)
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.f = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits f(x), shape (B, num_classes)."""
        return self.f(x)

    # All methods below take either images (``x``) or precomputed logits (``logits=``), so a training step
    # can run the network once and derive every term from the same logits.
    def _logits(self, x: Optional[torch.Tensor], logits: Optional[torch.Tensor]) -> torch.Tensor:
        if logits is None:
            if x is None:
                raise ValueError("pass images x or logits=")
            logits = self.f(x)
        return logits

    def log_px(self, x: Optional[torch.Tensor] = None, *, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Unnormalised log p(x) = LogSumExp_y f(x)[y] (the normaliser Z is intractable)."""
        return self._logits(x, logits).logsumexp(dim=1)

    def log_pxy(
        self, x: Optional[torch.Tensor], y: torch.Tensor, *, logits: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Unnormalised log p(x, y) = f(x)[y]."""
        return self._logits(x, logits).gather(1, y.view(-1, 1)).squeeze(1)

    def energy(
        self, x: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None, *, logits: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """E(x) = -LSE f(x) when ``y`` is None, else E(x, y) = -f(x)[y]."""
        if y is None:
            return -self.log_px(x, logits=logits)
        return -self.log_pxy(x, y, logits=logits)

    def log_p_y_given_x(self, x: Optional[torch.Tensor] = None, *, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log p(y|x) = log_softmax f(x), shape (B, num_classes)."""
        return self._logits(x, logits).log_softmax(dim=1)

    @torch.no_grad()
    def logits(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Logits for any number of float images, in batches on the model's device, in eval mode; on x's device."""
        device = next(self.parameters()).device
        with eval_mode(self):
            return in_batches(lambda xb: self.f(xb).to(x.device), x, batch_size, device)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Predicted class for every image, in batches."""
        return self.logits(x, batch_size).argmax(1)
