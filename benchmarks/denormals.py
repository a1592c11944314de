"""The cost of subnormal floats on the CPU: one training step of a run's last checkpoint with them and flushed to zero.

A classifier grown over-confident (a logit 87-103 below the largest) has softmax probabilities below float32's
smallest normal number, 1.2e-38; x86 CPUs compute with such subnormals an order of magnitude slower. Training and
every command flush them on the CPU (``build.pick_device``). This script times a forward
and backward pass of cross-entropy on the network's own answers for the first ``--batch`` training images (train
mode, as in training), alternating the two settings, and counts the subnormal probabilities.

    python benchmarks/denormals.py runs/quality/fm-parity-pl-ssl10-s0/seed0/baseline --data-root DATA
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from jemtorch.build import load_run
from jemtorch.checkpoint import load_safe
from jemtorch.data import to_float


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per setting and round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (subnormals kept, flushed)")
    args = ap.parse_args()
    if not torch.set_flush_denormal(False):
        raise SystemExit("error: this CPU cannot flush subnormals; there is nothing to compare")
    r = load_run(args.run, device="cpu", data_root=args.data_root)
    r.jem.f.load_state_dict(load_safe(r.run_dir / "checkpoint.pt", "cpu")["model"])  # the last weights, not best.pt
    r.jem.train()
    x = to_float(r.data.x_train[: args.batch])
    tiny = torch.finfo(torch.float32).tiny

    def step() -> torch.Tensor:
        r.jem.zero_grad()
        logits = r.jem(x)
        F.cross_entropy(logits, logits.argmax(1)).backward()
        return logits.detach()

    print(f"{r.run_dir}: {args.batch} training images, forward + backward of cross-entropy, {args.repeats} steps each")
    print("| round | subnormals | s per step | subnormal probabilities |\n|---|---|---|---|")
    times = {False: [], True: []}
    for rnd in range(args.rounds):
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            p = step().softmax(1)  # warm-up step; its probabilities counted
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                step()
            times[flush].append((time.perf_counter() - t0) / args.repeats)
            print(f"| {rnd} | {'flushed' if flush else 'kept'} | {times[flush][-1]:.3f} | "
                  f"{int(((p > 0) & (p < tiny)).sum())} of {p.numel()} |")
    torch.set_flush_denormal(False)
    kept, flushed = min(times[False]), min(times[True])
    print(f"fastest step: kept {kept:.3f} s, flushed {flushed:.3f} s ({kept / flushed:.1f}x)")


if __name__ == "__main__":
    main()
