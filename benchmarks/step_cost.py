"""Cost of a JEM training step relative to a plain classifier step, measured side by side.

Both steps run through the same Trainer.iteration (the classifier is ``p_x_weight=0``), same model, batch and
device, interleaved round by round so machine noise hits both alike. The floor is (2K+6)/3 network-pass units:
an SGLD step ≈ forward + input-only backward ≈ 2, the loss ≈ forward+backward on data and samples ≈ 6, a
classifier step ≈ forward+backward on data ≈ 3.

    python benchmarks/step_cost.py                       # cnn on 1×8×8 and 3×32×32, wrn-10-2 on 3×32×32, K=20
    python benchmarks/step_cost.py --amp bf16 --channels-last --compile   # each case plain, then with these settings
    python benchmarks/step_cost.py --device cuda --cases wrn-28-10:3x32x32 --batch 64 --k 20 --amp bf16
    python benchmarks/step_cost.py --tail --cases cnn-silu-16:1x28x28 --k 5   # the classifier's tail: its backward modes

``--tail`` times JEM steps in the classifier's tail (--px-stop-epoch 1, --px-tail-scale 1) instead, one per way its
gradient is taken: the whole gradient (one backward pass), --grad-surgery (two: the classifier's and the rest's), and
--px-tail-grad logit-shift with --px-tail-leak 0.05 (one, and the logits' shift through the last layer alone).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from jemtorch import ImageData, Trainer, make_config


def synthetic(shape, n=2048, classes=10) -> ImageData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % classes
    return ImageData(f"synthetic{shape}", x, y, x[:256], y[:256], [str(i) for i in range(classes)], pad=0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(trainers: dict, rounds: int, steps: int, warmup: int) -> dict:
    """Median seconds per training step of each trainer, timed round by round in turn so machine noise hits all alike."""
    times = {name: [] for name in trainers}
    for t in trainers.values():
        for _ in range(warmup):
            t.iteration()
    for _ in range(rounds):
        for name, t in trainers.items():
            sync(t.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                t.iteration()
            sync(t.device)
            times[name].append((time.perf_counter() - t0) / steps)
    return {name: statistics.median(v) for name, v in times.items()}


def bench(model: str, shape, k: int, batch: int, device: str, rounds: int, steps: int, warmup: int,
          speed: dict, recipe: str = "jem") -> dict:
    data = synthetic(shape)
    common = dict(dataset="imagefolder", recipe=recipe, model=model, batch_size=batch, sgld_steps=k, device=device,
                  progress=False, n_valid=0, buffer_size=1000, warmup_iters=0, **speed)
    trainers = {"clf": Trainer(make_config(p_x_weight=0.0, **common), data),
                "jem": Trainer(make_config(p_x_weight=1.0, **common), data)}
    times = interleaved(trainers, rounds, steps, warmup)
    clf, jem = times["clf"], times["jem"]
    floor = (2 * k + 6) / 3
    label = ", ".join(f"{k}={v}" for k, v in speed.items() if v not in (False, "none")) or "plain"
    return {"settings": label, "model": model, "input": "×".join(map(str, shape)), "K": k, "batch": batch, "clf_ms": clf * 1e3,
            "jem_ms": jem * 1e3, "ratio": jem / clf, "floor": floor, "ratio/floor": jem / clf / floor}


TAIL = {"whole gradient": {}, "--grad-surgery (two passes)": {"grad_surgery": True},
        "--px-tail-grad logit-shift --px-tail-leak 0.05": {"px_tail_grad": "logit-shift", "px_tail_leak": 0.05}}


def bench_tail(model: str, shape, k: int, batch: int, rounds: int, steps: int, warmup: int) -> dict:
    """Median seconds per tail step for each way of TAIL, interleaved round by round."""
    data = synthetic(shape)
    common = dict(dataset="imagefolder", model=model, batch_size=batch, sgld_steps=k, progress=False, n_valid=0,
                  buffer_size=1000, warmup_iters=0, norm="none", p_x_weight=0.3, epochs=3, px_start_epoch=0,
                  px_stop_epoch=1, px_tail_scale=1.0)
    trainers = {name: Trainer(make_config(**common, **extra), data) for name, extra in TAIL.items()}
    for t in trainers.values():
        t.state.step = t.phases.stop  # into the tail
        assert t.phases.tail(t.state.step)
    return interleaved(trainers, rounds, steps, warmup)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per round and kind")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cases", default="cnn:1x8x8,cnn:3x32x32,wrn-10-2:3x32x32")
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help="also measure each case with bf16 autocast")
    p.add_argument("--channels-last", action="store_true", help="also measure each case in channels-last format")
    p.add_argument("--compile", action="store_true", help="also measure each case with torch.compile")
    p.add_argument("--recipe", default="jem", help="the recipe both steps follow (jem, jempp, sadajem); the floor "
                   "counts SGLD passes only, so it is exact for jem alone")
    p.add_argument("--tail", action="store_true", help="time the tail's ways of taking the gradient instead (CPU)")
    args = p.parse_args()
    if args.tail:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; tail steps (K={args.k}, batch {args.batch})")
        print("| model | input | " + " | ".join(f"{n} (ms)" for n in TAIL) + " | last ÷ first |")
        print("|---|---|" + "---|" * (len(TAIL) + 1))
        for case in args.cases.split(","):
            model, shape = case.split(":")
            r = bench_tail(model, tuple(int(v) for v in shape.split("x")), args.k, args.batch, args.rounds, args.steps,
                           args.warmup)
            ms = list(r.values())
            print(f"| {model} | {shape} | " + " | ".join(f"{v * 1e3:.1f}" for v in ms) + f" | {ms[-1] / ms[0]:.2f} |",
                  flush=True)
        return
    speed = {"amp": args.amp, "channels_last": args.channels_last, "compile": args.compile}
    variants = [{}] + ([speed] if any(v not in (False, "none") for v in speed.values()) else [])
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, device {args.device} ({name}), recipe {args.recipe}")
    print("| settings | model | input | K | batch | classifier step (ms) | JEM step (ms) | JEM/classifier | floor (2K+6)/3 "
          "| ratio/floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        model, shape = case.split(":")
        for variant in variants:
            r = bench(model, tuple(int(v) for v in shape.split("x")), args.k, args.batch, args.device, args.rounds,
                      args.steps, args.warmup, variant, args.recipe)
            print(f"| {r['settings']} | {r['model']} | {r['input']} | {r['K']} | {r['batch']} | {r['clf_ms']:.1f} | "
                  f"{r['jem_ms']:.1f} | {r['ratio']:.2f} | {r['floor']:.2f} | {r['ratio/floor']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
