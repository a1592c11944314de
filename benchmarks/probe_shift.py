"""log p(x) in two parts: which one rates OOD images above the training data?

A JEM's log p(x) = LogSumExp_y f(x)[y] (up to log Z) splits exactly into

    shift(x)      = the mean of the logits, which the softmax ignores: only the generative terms train it
    confidence(x) = LogSumExp_y (f(x)[y] − shift(x)), the classifier's part (how peaked its logits are)

For each run (``RUN``, or ``RUN@FILE`` to read the weights and replay buffer of another checkpoint in that run's
directory, e.g. ``RUN@checkpoint-epoch8.pt``; ``LABEL=`` before either names its panel) this prints the medians of
both parts and of log p(x) on ``--n`` test images (jem eval's), on each ``--ood`` set and on the replay buffer, and
the AUROC of each part and of log p(x) between the test images (positive) and each OOD set, and within each set the
correlation of the shift with the images' PNG length (``detectors.png_bits``: input complexity). ``--out PNG`` draws each
run as a panel of (confidence, shift) points with the line of the test images' median log p(x): points above it are
rated likelier than the data. Nothing is fitted; the runs are not changed.

    python benchmarks/probe_shift.py "epoch 8=RUN@checkpoint-epoch8.pt" end=RUN --data-root DATA --out shift.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from jemtorch.build import load_run
from jemtorch.checkpoint import CheckpointError, load_safe
from jemtorch.data import make_ood_set
from jemtorch.detectors import png_bits
from jemtorch.evaluate import scored_test_images
from jemtorch.figures import energy_parts_figure
from jemtorch.metrics import ood_metrics


def parts(jem, x: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, confidence) of float images ``x``: the logits' mean and LogSumExp of the centred logits (N each)."""
    f = jem.logits(x, batch).double().cpu()
    shift = f.mean(1)
    return shift, (f - shift[:, None]).logsumexp(1)


def load(spec: str, data_root, datasets: dict):
    """A run, with the weights and buffer of ``RUN@FILE`` (a checkpoint file inside RUN) when one is named."""
    run_dir, _, name = spec.partition("@")
    run = load_run(run_dir, device="cpu", data_root=data_root, datasets=datasets)
    if name:
        path = Path(run_dir) / name
        if Path(name).name != name or not path.is_file():
            raise SystemExit(f"error: {spec}: no checkpoint file {name!r} in {run_dir}")
        try:
            state = load_safe(path, "cpu")
            run.jem.f.load_state_dict(state["model"])
            run.buffer = state["buffer"]["data"] if run.buffer is not None else None
        except (CheckpointError, KeyError, RuntimeError, TypeError) as e:
            raise SystemExit(f"error: {spec}: not a checkpoint of this run ({str(e).splitlines()[0]})") from None
    run.jem.eval()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="[LABEL=]RUN[@CHECKPOINT_FILE]")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--ood", default="mnist")
    ap.add_argument("--n", type=int, default=2000, help="test images, images per OOD set and buffer images")
    ap.add_argument("--out", default=None, help="a PNG of (confidence, shift) per run")
    args = ap.parse_args()
    datasets, panels = {}, {}
    for arg in args.runs:
        label, named, spec = arg.partition("=")
        label, spec = (label, spec) if named else (arg, arg)
        run = load(spec, args.data_root, datasets)
        x = scored_test_images(run, args.n, torch.Generator().manual_seed(0))
        sets = {"test": x}
        for name in args.ood.split(","):
            sets[name] = make_ood_set(name, x, args.n, seed=1, data_root=args.data_root or run.cfg.data_root,
                                      in_dataset=run.cfg.dataset)
        if run.buffer is not None:
            sets["buffer"] = run.buffer[: args.n].float().cpu()
        with torch.no_grad():
            got = {k: parts(run.jem, v) for k, v in sets.items()}
        print(f"\n{arg}\n| set | shift | confidence | log p(x) | AUROC: shift / confidence / log p(x) | r(shift, PNG) |"
              "\n|---|---|---|---|---|---|")
        s0, c0 = got["test"]
        for k, (s, c) in got.items():
            auc = "—" if k == "test" else " / ".join(
                f"{ood_metrics(a.numpy(), b.numpy())['auroc']:.3f}" for a, b in ((s0, s), (c0, c), (s0 + c0, s + c)))
            r = torch.corrcoef(torch.stack([s, png_bits(sets[k])]))[0, 1]
            print(f"| {k} | {s.median():.2f} | {c.median():.2f} | {(s + c).median():.2f} | {auc} | {r:.2f} |", flush=True)
        panels[label] = {k: (c, s) for k, (s, c) in got.items()}
    if args.out:
        print(f"wrote {energy_parts_figure(panels, Path(args.out))}")


if __name__ == "__main__":
    main()
