"""Calibration of trained runs on their own validation split: accuracy, ECE raw, fitted temperature, ECE after
temperature scaling, and the spread of LogSumExp f(x) (= −E(x)) over the validation images, one line per run.

A quick look for probe runs (no test set touched, no OOD sets built; `jem eval` does the full evaluation, with the
temperature fitted on the validation split and ECE measured on the test set — here both are the validation split). The
LogSumExp spread shows what an energy penalty does to the classifier: a per-example penalty holds every image at the
same energy (small spread, under-confident), a plain classifier lets confident images reach larger LogSumExp.

    python benchmarks/probe_calibration.py runs/probe/J-preset runs/probe/S-bm-k2
"""
from __future__ import annotations

import argparse

import torch

import jemtorch
from jemtorch.data import to_float
from jemtorch.metrics import expected_calibration_error, fit_temperature


def calibration(run: str, n_bins: int = 15) -> dict:
    try:
        model = jemtorch.load(run, device="cpu")
        x_val, y_val = model.validation_split()
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    logits = model.jem.logits(to_float(x_val), 500).float().cpu()
    t = fit_temperature(logits, y_val)
    lse = torch.logsumexp(logits, 1)
    return {"run": run, "val_accuracy": (logits.argmax(1) == y_val).float().mean().item(),
            "ece": expected_calibration_error(logits.softmax(1), y_val, n_bins), "temperature": t,
            "ece_ts": expected_calibration_error((logits / t).softmax(1), y_val, n_bins),
            "lse_mean": lse.mean().item(), "lse_std": lse.std().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories")
    ap.add_argument("--bins", type=int, default=15)
    args = ap.parse_args()
    print("| run | val accuracy | ECE | T | ECE (TS) | LogSumExp f(x) mean ± sd |\n|---|---|---|---|---|---|")
    for run in args.runs:
        c = calibration(run, args.bins)
        print(f"| {run} | {100 * c['val_accuracy']:.2f}% | {100 * c['ece']:.2f}% | {c['temperature']:.2f} | "
              f"{100 * c['ece_ts']:.2f}% | {c['lse_mean']:.2f} ± {c['lse_std']:.2f} |")


if __name__ == "__main__":
    main()
