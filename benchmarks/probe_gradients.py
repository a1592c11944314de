"""The classifier's and the density's gradients of a trained JEM, side by side: do they conflict, and how large is each?

Loads a JEM run at one of its checkpoints (a kept ``checkpoint-epoch<E>.pt`` or ``checkpoint.pt``), draws ``--batches``
training batches as the loop would (the run's augmentation, its replay buffer and chains), and for each computes the
cross-entropy's gradient c and the generative terms' gradient g at the density phase's full weights
(``objective.split_gradients``, as ``--grad-surgery`` does). Prints per batch cos(g, c) and ‖g‖/‖c‖, then how
consistent each gradient is from batch to batch (the mean pairwise cosine; the norm of the mean over the norm of one)
and the cosine of the two mean gradients. In the classifier's tail g is ``--px-tail-scale`` times smaller, its cosines
the same. The run is only read; nothing is written.

    python benchmarks/probe_gradients.py runs/quality/fm-silu16-pause2-s4/seed4/jem --checkpoint checkpoint-epoch8.pt
"""
from __future__ import annotations

import argparse
import json
import tempfile
from itertools import combinations
from pathlib import Path

import torch

from jemtorch import TrainConfig, Trainer
from jemtorch.checkpoint import load_safe
from jemtorch.objective import Weights, jem_loss, split_gradients
from jemtorch.train import n_chains, training_batch


def flat(grads) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a JEM run directory")
    ap.add_argument("--checkpoint", default="checkpoint.pt", help="the checkpoint in the run to load")
    ap.add_argument("--batches", type=int, default=12, help="training batches to take the gradients on")
    ap.add_argument("--data-root", default=None, help="where the datasets are (default: the run's)")
    ap.add_argument("--px-data-batches", type=int, default=None, help="the p(x) term's data batches (default: the run's)")
    args = ap.parse_args()
    run = Path(args.run)
    saved = json.loads((run / "config.json").read_text())
    if saved.get("p_x_weight", 0) <= 0:
        raise SystemExit(f"error: {run} is not a JEM run (p_x_weight 0): it has no density gradient")
    if args.batches < 2:
        raise SystemExit("error: --batches must be >= 2")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:  # the trainer's run directory: never the run's own
        over = {"out": tmp, "name": "probe", "progress": False, "tensorboard": False, "keep_epochs": "",
                **({"px_data_batches": args.px_data_batches} if args.px_data_batches else {})}
        cfg = TrainConfig.from_dict({**saved, **over, **({"data_root": args.data_root} if args.data_root else {})})
        t = Trainer(cfg)
        t.load_full_state(load_safe(run / args.checkpoint))
    t.state.loss_jem.train()
    full = Weights.from_config(cfg)
    params = [p for p in t.state.jem.parameters() if p.requires_grad]
    cs, gs = [], []
    print(f"{run} at {args.checkpoint} (step {t.state.step}), weights {full}, {cfg.px_data_batches} p(x) data batches")
    print("| batch | cos(g, c) | ‖g‖/‖c‖ | ‖c‖ |\n|---|---|---|---|")
    for k in range(args.batches):
        x, y, x_px = training_batch(cfg, t.labeled, t.unlabeled, t.state.step + k, t.pad, t.flip, t.extra)
        samples = t.state.sampler.sample(t.state.jem, min(len(x_px if x_px is not None else x), n_chains(cfg, x)))
        loss, stats = jem_loss(t.state.loss_jem, x, y, weights=full, x_px=x_px, samples=samples,
                               separate=cfg.separate_forward, running=cfg.px_norm == "running")
        for p in params:
            p.grad = None
        c, g, _ = split_gradients(params, full.clf * stats["l_clf"], loss)
        cs.append(flat(c))
        gs.append(flat(g))
        print(f"| {k} | {cos(gs[-1], cs[-1]):+.3f} | {float(gs[-1].norm() / cs[-1].norm()):.2f} | "
              f"{float(cs[-1].norm()):.3f} |")
    for name, vs in (("c (classifier)", cs), ("g (density)", gs)):
        pair = sum(cos(a, b) for a, b in combinations(vs, 2)) / (len(vs) * (len(vs) - 1) / 2)
        mean = torch.stack(vs).mean(0)
        print(f"{name}: mean pairwise cosine between batches {pair:+.3f}, ‖mean‖/mean ‖·‖ "
              f"{float(mean.norm()) / (sum(float(v.norm()) for v in vs) / len(vs)):.2f}")
    print(f"mean ‖g‖/‖c‖ {sum(float(g.norm() / c.norm()) for g, c in zip(gs, cs)) / len(cs):.2f}")
    cm, gm = torch.stack(cs).mean(0), torch.stack(gs).mean(0)
    print(f"cos(mean g, mean c) {cos(gm, cm):+.3f}; per batch cos(g, c): mean "
          f"{sum(cos(g, c) for g, c in zip(gs, cs)) / len(cs):+.3f}, conflicting on {sum(cos(g, c) < 0 for g, c in zip(gs, cs))} "
          f"of {len(cs)}")


if __name__ == "__main__":
    main()
