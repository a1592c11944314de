"""Does a chain step matched to the energy's steepness keep fresh samples near the data?

A classifier-only tail steepens the energy (docs/results/density.md: RMS ∇ₓE ×3 over three epochs) while the chains
keep the step size the density was trained with, and fresh chains then walk away from the data. This probe loads a
run and a reference classifier and, for each chain step size given, runs class-conditional fresh chains from the
run's initial distribution with its chain update (only the step size changed) and prints the Fréchet distance to test
images in the reference's features and the reference's accuracy on the chains, at several chain lengths — the
quality benchmark's sample table, one row per step size. It also prints the RMS of ∇ₓE on test images and on chain
starts, so runs can be compared by how steep their energy is. The run is not changed.

``--noises`` adds rows with the chain noise σ changed instead, and ``--buffer`` a row that continues the run's own
replay buffer (as trained, its chains' update unchanged, unconditional) on the trained model: do chains that were
good when training ended stay good when the model stops changing? ``--energy-stop`` adds two rows whose chains
(the run's own update) each stop once their energy reaches a target taken from training images: their median
energy, or the energy of one training image drawn per chain (the data's spread of energies): would a chain that
stops where the data's energy is sample better than one of fixed length? (Each row: FD, the reference's accuracy on the
class the chain was drawn for — the buffer's: the class the reference gives it at the start —, and the share of
pixels at |x| ≥ 0.99: a rising share is the oversaturation of long-run chains, Nijkamp et al. 2020.)

    python benchmarks/probe_step.py runs/quality/fm-stop8/seed0/jem runs/quality/fm-stop8/seed0/baseline \
        --steps 1,0.5,0.3,0.1 --caps 0.02,0.01 [--cap-noise] --noises 0.01 --buffer [--energy-stop]
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from jemtorch.build import load_run
from jemtorch.data import to_float
from jemtorch.detectors import model_outputs
from jemtorch.evaluate import fresh_chain_path
from jemtorch.metrics import frechet_distance


def grad_rms(jem, x: torch.Tensor) -> float:
    """RMS over images and pixels of ∇ₓE(x) (eval mode), E = −LogSumExp f(x)."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(-jem.log_px(x).sum(), x)
    return float(g.pow(2).mean().sqrt())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a JEM run directory")
    ap.add_argument("reference", help="the classifier whose features the FD is measured in (its baseline)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--steps", default="1", help="comma-separated chain step sizes (the run's own is --sgld-lr)")
    ap.add_argument("--caps", default="", help="comma-separated --sgld-step-cap values, each with the run's step size")
    ap.add_argument("--cap-noise", action="store_true",
                    help="each cap again with --sgld-cap-noise (the noise lowered with the step the cap leaves)")
    ap.add_argument("--noises", default="", help="comma-separated --sgld-std values, each with the run's step size")
    ap.add_argument("--buffer", action="store_true", help="also continue the run's replay buffer on the trained model")
    ap.add_argument("--energy-stop", action="store_true",
                    help="also chains that stop at the training images' energy (their median; one drawn per chain)")
    ap.add_argument("--lengths", default="5,20,50,200,400", help="comma-separated chain lengths the table shows")
    ap.add_argument("--n", type=int, default=500, help="chains (class-conditional, equal per class) and test images")
    args = ap.parse_args()
    try:
        variants = [{"sgld_lr": float(s)} for s in args.steps.split(",") if s]
        variants += [{"sgld_step_cap": float(m)} for m in args.caps.split(",") if m]
        variants += [{"sgld_std": float(m)} for m in args.noises.split(",") if m]
        lengths = sorted({int(k) for k in args.lengths.split(",") if k})
        if not lengths or lengths[0] < 1:
            raise ValueError(f"--lengths must be chain lengths >= 1, got {args.lengths!r}")
        run, ref = load_run(args.run, "cpu", args.data_root), load_run(args.reference, "cpu", args.data_root)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.buffer and run.buffer is None:
        raise SystemExit(f"error: {args.run} has no replay buffer to continue (a classifier run?); drop --buffer")
    run.jem.eval()
    c = run.data.num_classes
    y = torch.arange(c).repeat_interleave(-(-args.n // c))[:args.n]
    g = torch.Generator().manual_seed(0)
    real = to_float(run.data.x_test[torch.randperm(len(run.data.x_test), generator=g)[:args.n]])
    real_feat = model_outputs(ref.jem, real, grad=False).features.numpy()
    torch.manual_seed(7)
    starts = run.sampler().buffer.init.sample(args.n, y)
    print(f"{args.run} (trained with step {run.cfg.sgld_lr}, noise {run.cfg.final_sgld_std}, {run.cfg.sgld_update}); "
          f"RMS ∇ₓE on test images {grad_rms(run.jem, real[:200]):.4f}, on chain starts {grad_rms(run.jem, starts[:200]):.4f}")

    def row(x: torch.Tensor, labels: torch.Tensor = y) -> str:
        o = model_outputs(ref.jem, x.cpu(), grad=False)
        fd = frechet_distance(o.features.numpy(), real_feat)
        sat = float((x.abs() >= 0.99).float().mean())
        return f"{fd:.1f} ({float((o.logits.argmax(1) == labels).float().mean()):.2f}, {sat:.2f})"

    print(f"\nFD to {args.n} test images (the reference's accuracy, share of pixels at |x| ≥ 0.99; test images: "
          f"{float((real.abs() >= 0.99).float().mean()):.2f})")
    print("\n| chains | starts | " + " | ".join(f"{k} steps" for k in lengths) + " |")
    print("|---" * (len(lengths) + 2) + "|")
    if args.buffer:
        x = run.buffer[torch.randperm(len(run.buffer), generator=g)[:args.n]].float()
        labels = model_outputs(ref.jem, x, grad=False).logits.argmax(1)
        sampler, done, cells = run.sampler(), 0, [row(x, labels)]
        for k in lengths:
            x, done = sampler.run_chains(run.jem, x, None, k - done), k
            cells.append(row(x.clamp(-1, 1), labels))
        print("| the replay buffer, continued (as trained) | " + " | ".join(cells) + " |", flush=True)
    base = row(starts)
    cfg = run.cfg.as_trained()  # one σ: the one the model last trained with
    for v in variants:
        run.cfg = dataclasses.replace(cfg, **v)
        path = fresh_chain_path(run, args.n, lengths, y=y, seed=7)
        (key, value), *cap_noise = v.items()
        name = {"sgld_lr": f"α {value:g}", "sgld_step_cap": f"α {cfg.sgld_lr:g}, cap {value:g}",
                "sgld_std": f"α {cfg.sgld_lr:g}, noise σ {value:g}"}[key] + (", noise with the step" if cap_noise else "")
        print(f"| fresh, {name} | {base} | " + " | ".join(row(path[k]) for k in lengths) + " |", flush=True)
    if args.energy_stop:
        run.cfg = cfg
        train = to_float(run.data.x_train[torch.randperm(len(run.data.x_train), generator=g)[:2000]])
        with torch.no_grad():
            e_train = -run.jem.log_px(train)
        drawn = e_train[torch.randint(len(e_train), (args.n,), generator=g)]
        for name, target in ((f"median training energy {e_train.median():.2f}", e_train.median().expand(args.n)),
                             ("one training image's energy per chain", drawn)):
            cells = [row(x) for x in energy_stopped(run, starts, y, target, lengths)]
            print(f"| fresh, stopped at the {name} | {base} | " + " | ".join(cells) + " |", flush=True)


def energy_stopped(run, starts: torch.Tensor, y: torch.Tensor, target: torch.Tensor, lengths: list[int]) -> list:
    """Fresh chains from ``starts`` (the run's chain update, one step at a time), each frozen once its energy
    E(x) = −LogSumExp f(x) is at or below its ``target``: the chains at each of ``lengths`` (clamped to [−1, 1])."""
    sampler, x, out = run.sampler(), starts.clone(), []
    stopped = torch.zeros(len(x), dtype=torch.bool)
    for k in range(1, max(lengths) + 1):
        with torch.no_grad():
            stopped |= -run.jem.log_px(x) <= target
        x = torch.where(stopped[:, None, None, None], x, sampler.run_chains(run.jem, x, y, 1))
        if k in lengths:
            out.append(x.clamp(-1, 1))
    print(f"energy stop: {float(stopped.float().mean()):.2f} of the chains stopped within {max(lengths)} steps",
          flush=True)
    return out


if __name__ == "__main__":
    main()
