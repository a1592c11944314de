"""Data-parallel scaling on this machine: training throughput of 1 vs N processes (torchrun, gloo on CPU).

Each process gets one thread and the same per-process batch, so N processes train on an N× larger global batch;
efficiency = (images/s with N processes) / (N × images/s with 1). Both rows run in one invocation, one after the
other, on the same data and model.

    python benchmarks/scaling.py                                  # digits, cnn-16, JEM K=5, 1 vs 2 processes
    python benchmarks/scaling.py --nproc 1,2 --p-x-weight 0       # the classifier alone

What CPU gloo can tell about GPUs: only that the wiring scales (sharding, per-rank buffers, one gradient all-reduce
per step, no communication while sampling). It cannot tell NCCL bandwidth, GPU kernel overlap or multi-node
latency; measure those on the GPUs you have.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "jemtorch", "train", *args, "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads((out / "summary.json").read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", default="1,2")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--model", default="cnn-16")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--sgld-steps", type=int, default=5)
    p.add_argument("--p-x-weight", default="1")
    p.add_argument("--iters", type=int, default=100)
    a = p.parse_args()
    args = ["--dataset", a.dataset, "--data-root", a.data_root, "--model", a.model, "--batch-size", str(a.batch_size),
            "--sgld-steps", str(a.sgld_steps), "--p-x-weight", a.p_x_weight, "--max-iters", str(a.iters),
            "--epochs", "1000", "--eval-every", "1000", "--ckpt-every", "1000"]
    print(f"{a.dataset}, {a.model}, batch {a.batch_size} per process, K={a.sgld_steps}, p(x) weight {a.p_x_weight}, "
          f"{a.iters} iterations, 1 thread per process, {os.cpu_count()} CPUs")
    print("| processes | global batch | s/iteration | images/s | efficiency |")
    print("|---|---|---|---|---|")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(v) for v in a.nproc.split(",")):
            s = run(n, args, Path(tmp) / f"n{n}")
            per_it = s["train_seconds"] / s["iterations"]
            ips = s["global_batch"] / per_it
            base = base or ips / n
            print(f"| {n} | {s['global_batch']} | {per_it:.4f} | {ips:.0f} | {ips / (n * base):.2f} |", flush=True)


if __name__ == "__main__":
    main()
