"""What a cross-entropy tail does to a trained JEM: its accuracy, its smoothness and its density, step by step.

A healthy JEM is a smooth classifier (docs/results/density.md: 4–5× the baseline's distance to the decision boundary)
and 3–4 points less accurate. This probe loads a run, trains it further with cross-entropy alone (SGD, momentum 0.9,
weight decay 5e-4, constant ``--lr``, the run's augmentation, its training split) and prints every ``--every``
iterations: test accuracy, ``attacks.steepness`` (median boundary L2 distance, RMS ∇ₓE) on 1 000 test images, and the
AUROC of log p(x) between 2 000 test images and each OOD set — whether the density survives the tail. The run itself
is not changed. ``jem train --px-stop-epoch`` builds the same tail into training (under the run's schedule).

    python benchmarks/probe_tail.py runs/quality/fm-nonorm-w03-k5/seed0/jem --lr 0.03 --iters 1200 --every 300
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from jemtorch.attacks import steepness
from jemtorch.build import load_run
from jemtorch.data import augment, make_ood_set, to_float, training_splits
from jemtorch.metrics import ood_metrics

SETS = ("mnist", "constant", "interp", "uniform")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a JEM run directory")
    ap.add_argument("--data-root", default=None, help="where the datasets are (default: the run's)")
    ap.add_argument("--lr", type=float, default=0.03, help="constant learning rate of the tail")
    ap.add_argument("--iters", type=int, default=1200, help="cross-entropy iterations (batch 128)")
    ap.add_argument("--every", type=int, default=300, help="measure every this many iterations")
    ap.add_argument("--sets", default=",".join(SETS), help="OOD sets for log p(x)'s AUROC")
    args = ap.parse_args()
    if args.iters < 0 or args.every < 1 or args.lr <= 0:
        raise SystemExit("error: --iters must be >= 0, --every >= 1 and --lr > 0")
    torch.manual_seed(0)
    try:
        run = load_run(args.run, "cpu", args.data_root)
        x_ref = to_float(run.data.x_test[:1000])
        oods = {n: make_ood_set(n, x_ref, 1000, 0, run.cfg.data_root, run.cfg.dataset) for n in args.sets.split(",")}
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    jem, data, cfg = run.jem, run.data, run.cfg
    splits = training_splits(data, cfg.n_valid, cfg.seed, "cpu")
    x_test, y_test = to_float(data.x_test), data.y_test
    pick = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(0))[:2000]

    def measure(step: int) -> None:  # jem.logits and steepness each run the network in eval mode
        logits = jem.logits(x_test, 1000)
        acc = (logits.argmax(1) == y_test).float().mean().item()
        st = steepness(jem, x_test[pick[:1000]].clone())
        s_in = jem.log_px(logits=logits[pick]).numpy()
        au = {n: ood_metrics(s_in, jem.log_px(logits=jem.logits(o)).numpy())["auroc"] for n, o in oods.items()}
        print(f"| {step} | {acc:.2%} | {st['boundary_l2']:.3f} | {st['energy_grad_rms']:.4f} | {s_in.mean():.2f} | "
              + " | ".join(f"{v:.3f}" for v in au.values()) + " |", flush=True)

    print(f"{args.run}: cross-entropy tail, SGD lr {args.lr}, {args.iters} iterations\n")
    print("| iteration | test acc | boundary L2 | RMS ∇ₓE | mean log p(test) | "
          + " | ".join(f"log p(x) AUROC {n}" for n in oods) + " |")
    print("|---" * (5 + len(oods)) + "|")
    measure(0)
    opt = torch.optim.SGD(jem.f.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    jem.train()
    t0 = time.perf_counter()
    for step in range(1, args.iters + 1):
        i = torch.randint(0, len(splits.x_train), (128,))
        x = augment(to_float(splits.x_train[i]), data.pad, data.flip, cfg.data_noise)
        loss = F.cross_entropy(jem(x), splits.y_train[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.iters:
            measure(step)
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
