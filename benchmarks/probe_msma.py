"""Does the JEM's energy near an image, not only at it, tell its data from OOD images? Multiscale statistics.

For a trained run, each image of its test split (``--n``) and of each OOD set gets log p(x), its PNG bits/dim and the
log norm of ∇ₓ log p at the image; then, for each noise level σ of ``--sigmas``, at x + σε (one fixed Gaussian draw
per image): the log norm of ∇ₓ log p there (the multiscale score norms of MSMA: Mahmood, Oliva & Styner 2021,
"Multiscale score matching for out-of-distribution detection", ICLR), the fall of log p from x to x + σε, and the
cosine between ∇ₓ log p(x + σε) and −ε (does the energy's slope lead the noisy image back to the image?). Last, the
rise of log p along the run's own chain from the image (its chain update, noise and step cap, ``--chain`` steps): a
sampler trained to keep the data in place should move its data less than other images. Each
combination of columns is scored as ``typicality`` is: a kernel density fitted on ``--n-fit`` images of the run's
training split (never on test or OOD images). Prints AUROC (FPR at 95% TPR) per combination and OOD set.

    python benchmarks/probe_msma.py runs/quality/fm-std003-tail02/seed0/jem --data-root DATA --sigmas 0.03,0.1,0.3
"""
from __future__ import annotations

import torch
from probe_ascent import gather, print_table, probe_parser

from jemtorch.build import load_run
from jemtorch.detectors import model_outputs, png_bits
from jemtorch.sampler import CHAIN_UPDATES, frozen


def logp_and_grad(jem, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        lp = jem(x).logsumexp(1)
        (g,) = torch.autograd.grad(lp.sum(), x)
    return lp.detach().double(), g.detach()


def chain_rises(jem, update, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """log p after each of ``lengths`` steps of one run of ``update`` (a ``ChainUpdate``) from ``x``, minus log p(x):
    (N, len(lengths)). The update's step cap is one value per batch, as in training."""
    def log_density(z):
        return jem(z).logsumexp(1)

    with torch.no_grad():  # log p alone: the chain takes its own gradients
        lp0 = log_density(x).double()
    xk, rises, done = x, [], 0
    for k in lengths:
        xk, done = update.run(jem, log_density, xk, k - done), k
        with torch.no_grad():
            rises.append(log_density(xk).double() - lp0)
    return torch.stack(rises, 1)


def statistics(jem, x: torch.Tensor, sigmas: list[float], seed: int, update=None, lengths=(), batch: int = 500):
    """(N, 3 + 3·len(sigmas) + len(lengths)): log p, PNG bits/dim, log ‖∇‖; per σ: log ‖∇‖ at x + σε, log p(x) −
    log p(x + σε), cos(∇ log p(x + σε), −ε); per length, ``chain_rises``."""
    out = model_outputs(jem, x, batch, grad=True)
    cols = [out.logits.double().logsumexp(1), png_bits(x), (-out.gradnorm.double()).log()]
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x.shape, generator=g)
    with frozen(jem):
        for s in sigmas:
            lps, norms, coss = [], [], []
            for i in range(0, len(x), batch):
                e = eps[i : i + batch]
                lp, gr = logp_and_grad(jem, x[i : i + batch] + s * e)
                lps.append(lp)
                norms.append(gr.flatten(1).norm(dim=1).double().clamp(min=1e-12).log())
                coss.append(torch.nn.functional.cosine_similarity(gr.flatten(1), -e.flatten(1)).double())
            cols += [torch.cat(norms), cols[0] - torch.cat(lps), torch.cat(coss)]
        if lengths:
            torch.manual_seed(seed)  # the chains' noise
            cols += list(torch.cat([chain_rises(jem, update, x[i : i + batch], lengths)
                                    for i in range(0, len(x), batch)]).T)
    return torch.stack(cols, 1)


def main() -> None:
    ap = probe_parser(__doc__)
    ap.add_argument("--sigmas", default="0.01,0.03,0.1,0.3", help="noise levels (pixels in [−1, 1])")
    ap.add_argument("--chain", default="5,10,20", help="steps of the run's own chain the rise is read after")
    args = ap.parse_args()
    sigmas = [float(s) for s in args.sigmas.split(",")]
    run = load_run(args.run, data_root=args.data_root)
    lengths = [int(k) for k in args.chain.split(",")] if args.chain else []
    update = CHAIN_UPDATES[run.cfg.sgld_update](run.cfg.as_trained())
    stats = gather(run, args, lambda jem, x, key: statistics(jem, x, sigmas, key, update, lengths))  # own noise per set
    norm, drop, cos = ([k + 3 * j for j in range(len(sigmas))] for k in (3, 4, 5))
    combos = {"log p": (0, 1), "(log p, PNG)": [0, 1], "complexity: (log p, ‖∇‖, PNG)": [0, 1, 2],
              "MSMA: ‖∇‖ at every σ": [2] + norm, "(log p, PNG, ‖∇‖ at every σ)": [0, 1, 2] + norm,
              "(log p, PNG, drop at every σ)": [0, 1] + drop, "(log p, PNG, cos at every σ)": [0, 1] + cos}
    for j, s in enumerate(sigmas):
        combos.update({f"−drop{s} alone": (drop[j], -1), f"cos{s} alone": (cos[j], 1),
                       f"(log p, PNG, ‖∇‖{s})": [0, 1, norm[j]], f"(log p, PNG, drop{s})": [0, 1, drop[j]],
                       f"(log p, PNG, cos{s})": [0, 1, cos[j]]})
    for j, k in enumerate(lengths):
        c = 3 + 3 * len(sigmas) + j
        combos.update({f"−chain rise{k} alone": (c, -1), f"(log p, PNG, chain rise{k})": [0, 1, c]})
    print_table(run, stats, combos)


if __name__ == "__main__":
    main()
