"""Which lossless compressor measures input complexity best for the JEM's scores? PNG against WebP and JPEG 2000.

Serrà et al. 2020 ("Input complexity and out-of-distribution detection with likelihood-based generative models",
ICLR) compare a likelihood with a compressor's code length and find that the better the compressor, the better the
OOD score (FLIF best of theirs; not in Pillow). The JEM's density part rates simple images high (its log p(x)
follows −PNG length at r ≈ −0.9 on Fashion-MNIST: ``probe_shift.py``), so the detectors that condition on the length
(``complexity``, ``ascent``) read what is left. This probe scores, for each compressor C (``--compressors``, lossless
each, bits per dimension), the kernel densities (log p, C) and ``ascent``'s (log p, C, log rise₁₀) and the length
alone, fitted on ``--n-fit`` training images as ``probe_ascent.py`` does, never on test or OOD images.

    python benchmarks/probe_complexity.py RUN --data-root DATA --n-fit 10000 --centres 10000
"""
from __future__ import annotations

import torch
from probe_ascent import gather, print_table, probe_parser

from jemtorch.build import load_run
from jemtorch.detectors import ASCENT_STEPS, CODEC_SAVE, Typicality, ascent_path, encoded_bits, model_outputs, png_bits
from jemtorch.sampler import frozen

SAVE = {"webp": dict(format="WEBP", lossless=True, quality=100, method=6),  # libwebp's slowest, smallest: 14 ms/image
        "webp4": CODEC_SAVE["webp"],  # the shipped codec, libwebp's default effort: 0.5 ms/image, as PNG
        "j2k": dict(format="JPEG2000", irreversible=False)}


def code_bits(x: torch.Tensor, name: str) -> torch.Tensor:
    """Each float image's lossless code length under compressor ``name`` (png, webp, webp4, j2k), bits per dimension."""
    return png_bits(x) if name == "png" else encoded_bits(x, **SAVE[name])


def statistics(jem, x: torch.Tensor, compressors: list[str], batch: int = 500) -> torch.Tensor:
    """(N, 2 + len(compressors)): log p(x), the log rise after ``ASCENT_STEPS`` capped ascent steps, each code length."""
    out = model_outputs(jem, x, batch, grad=False)
    with frozen(jem):
        rise = torch.cat([ascent_path(jem, x[i : i + batch], (ASCENT_STEPS,)) for i in range(0, len(x), batch)])[:, 0]
    return torch.stack([out.logits.double().logsumexp(1), rise.double().clamp(min=1e-6).log(),
                        *[code_bits(x, c) for c in compressors]], 1)


def main() -> None:
    ap = probe_parser(__doc__)
    ap.add_argument("--compressors", default="png,webp,j2k", help=f"of png, {', '.join(SAVE)}")
    ap.add_argument("--centres", type=int, default=Typicality.MAX_POINTS, help="kernel centres kept of the fit rows")
    args = ap.parse_args()
    names = args.compressors.split(",")
    bad = [c for c in names if c != "png" and c not in SAVE]
    if bad:
        raise SystemExit(f"error: unknown compressor {bad[0]!r} (png, {', '.join(SAVE)})")
    run = load_run(args.run, data_root=args.data_root)
    stats = gather(run, args, lambda jem, x, _: statistics(jem, x, names))
    combos = {"log p": (0, 1)}
    for j, c in enumerate(names):
        combos.update({f"{c} alone": (2 + j, -1), f"(log p, {c})": [0, 2 + j], f"(log p, {c}, rise)": [0, 2 + j, 1]})
    print_table(run, stats, combos, args.centres)


if __name__ == "__main__":
    main()
