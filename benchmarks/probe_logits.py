"""Which score of the logits alone tells a run's test images from OOD images? The classifier's side of the JEM.

A JEM's logits carry two things: the shift, their mean, which the softmax ignores and only the generative terms
train (``probe_shift.py``), and the classifier's logits around it. MaxLogit (Hendrycks et al. 2022) reads both, so on
a JEM it reads the density as much as the classifier; the logits' maximum less their mean reads the classifier
alone, as MaxLogit does on a classifier, whose mean nothing trains. This probe prints, for one run (a JEM or its
baseline: run it on both), the AUROC (FPR at 95% TPR) of each score of the logits on ``--n`` test images (jem eval's)
against ``--n`` images of each ``--ood`` set: max p(y|x), MaxLogit, log p(x), max − mean, LogSumExp of the centred
logits, −entropy of p(y|x), the margin of the two largest. Nothing is fitted; the run is not changed.

    python benchmarks/probe_logits.py RUN --data-root DATA --ood data/cifar100/test,interp
"""
from __future__ import annotations

import torch
from probe_ascent import gather, print_table, probe_parser

from jemtorch.build import load_run
from jemtorch.detectors import model_outputs

SCORES = ("max p(y|x)", "MaxLogit", "log p(x)", "max − mean", "LogSumExp centred", "−entropy", "margin")


def statistics(jem, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """(N, len(SCORES)): each score of the logits of float images ``x``, higher = more in-distribution."""
    f = model_outputs(jem, x, batch, grad=False).logits.double()
    logp, top2, shift = f.log_softmax(1), f.topk(2, 1).values, f.mean(1)
    return torch.stack([logp.max(1).values.exp(), top2[:, 0], f.logsumexp(1), top2[:, 0] - shift,
                        (f - shift[:, None]).logsumexp(1), (logp.exp() * logp).sum(1), top2[:, 0] - top2[:, 1]], 1)


def main() -> None:
    args = probe_parser(__doc__).parse_args()
    run = load_run(args.run, data_root=args.data_root)
    stats = gather(run, args, lambda jem, x, _: statistics(jem, x), fit=False)  # nothing is fitted
    print_table(run, stats, {name: (j, 1) for j, name in enumerate(SCORES)})


if __name__ == "__main__":
    main()
