"""Are two trees of runs the same training, bit for bit? For refactors of the loop.

    git worktree add /tmp/before <commit>
    (cd /tmp/before && python benchmarks/quality.py --dataset digits --seeds 0 --n 60 --ood uniform,constant \\
        --out /tmp/q-before -- --model cnn-4 --epochs 2 --warmup-iters 0 --buffer-size 100 --sgld-steps 1)
    python benchmarks/quality.py ...the same... --out /tmp/q-after
    python tools/compare_runs.py /tmp/q-before /tmp/q-after      # exit 1 on any difference

Compares every checkpoint's model, optimiser, replay buffer, RNG state and step exactly, and every metrics.jsonl
record except timings and the statistics jemtorch 0.2 added (health records, reach, travel, saturation). Run both
sides with the same thread count (OMP_NUM_THREADS=1): float reductions depend on it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from jemtorch.checkpoint import load_safe

IGNORED = {"time", "reach", "travel", "saturation"}


def same(u, v) -> bool:
    if isinstance(u, torch.Tensor):
        return isinstance(v, torch.Tensor) and u.shape == v.shape and torch.equal(u, v)
    if isinstance(u, dict):
        return isinstance(v, dict) and u.keys() == v.keys() and all(same(u[k], v[k]) for k in u)
    if isinstance(u, (list, tuple)):
        return len(u) == len(v) and all(same(s, t) for s, t in zip(u, v))
    return u == v


def records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") != "health":
            out.append({k: v for k, v in rec.items() if k not in IGNORED})
    return out


def main(a: Path, b: Path) -> int:
    differences = compared = 0
    for f in sorted(a.rglob("*.pt")):
        if "cache" in f.parts:
            continue
        x, y = (load_safe(p) for p in (f, b / f.relative_to(a)))
        for key in ("model", "optimizer", "buffer", "rng", "step"):
            if key in x:
                compared += 1
                if not same(x[key], y.get(key)):
                    differences += 1
                    print(f"differs: {f.relative_to(a)} [{key}]")
    for f in sorted(a.rglob("metrics.jsonl")):
        compared += 1
        if records(f) != records(b / f.relative_to(a)):
            differences += 1
            print(f"differs: {f.relative_to(a)}")
    print(f"{compared} compared, {differences} differences")
    return 1 if differences or not compared else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
