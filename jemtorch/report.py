"""Figures and reports: one list of blocks rendered both as ``report.md`` and a self-contained ``report.html``."""
from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 110) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def reliability_figure(results: Sequence[dict], path: Path) -> Path:
    """Confidence vs accuracy per bin, one panel per run, bin counts printed above the bars."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        cal = r["calibration"]
        edges = np.array(cal["edges"])
        width = edges[1] - edges[0]
        centers = edges[:-1] + width / 2
        counts = np.array(cal["count"])
        acc = np.where(counts > 0, cal["accuracy"], 0)
        ax.bar(centers, acc, width=width * 0.95, color="#4C72B0", edgecolor="k", label="accuracy")
        gap_bottom = np.minimum(acc, centers)
        ax.bar(centers, np.abs(centers - acc) * (counts > 0), bottom=gap_bottom, width=width * 0.95, color="#DD8452",
               alpha=0.5, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        for x, a, c in zip(centers, acc, counts):
            if c > 0:
                ax.text(x, min(a, 0.93) + 0.02, str(c), ha="center", fontsize=6, rotation=90)
        ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="confidence", ylabel="accuracy",
               title=f"{r['name']}\nECE = {100 * r['ece']:.2f}% ({cal['n_bins']} bins)")
        ax.legend(loc="upper left", fontsize=7)
    return _save(fig, path)


def histogram_figure(results: Sequence[dict], score: str, path: Path) -> Path:
    """Score histograms, in-distribution vs each OOD set (rows) for each run (columns)."""
    plt = _plt()
    sets = [k for k in results[0]["_hist"] if k != "in"]
    fig, axes = plt.subplots(max(1, len(sets)), len(results), figsize=(4.2 * len(results), 2.4 * max(1, len(sets))),
                             squeeze=False)
    for j, r in enumerate(results):
        s_in = r["_hist"]["in"][score]
        for i, name in enumerate(sets):
            ax = axes[i][j]
            s_out = r["_hist"][name][score]
            both = np.r_[s_in, s_out]
            lo, hi = np.percentile(both, [0.5, 99.5])
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 50)
            ax.hist(np.clip(s_in, lo, hi), bins=bins, alpha=0.6, density=True, label=f"in ({r['dataset']})")
            ax.hist(np.clip(s_out, lo, hi), bins=bins, alpha=0.6, density=True, label=name)
            auroc = r["ood"][name][score]["auroc"]
            ax.set_title(f"{r['name']}: {score} vs {name} (AUROC {auroc:.3f})", fontsize=8)
            ax.legend(fontsize=7)
            ax.tick_params(labelsize=7)
    return _save(fig, path, dpi=100)


def curve_figure(curves: dict, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Line plot of {label: ([x...], [y...])}; used for robustness curves."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------------------------
class Report:
    """Blocks: ("h1"|"h2"|"p", text), ("table", header, rows), ("img", path, caption)."""

    def __init__(self, title: str):
        self.blocks: list[tuple] = [("h1", title)]

    def h2(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence]) -> None:
        self.blocks.append(("table", list(header), [list(r) for r in rows]))

    def img(self, path: Path, caption: str = "") -> None:
        self.blocks.append(("img", Path(path), caption))

    def markdown(self, base: Path) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h1":
                out.append(f"# {b[1]}\n")
            elif b[0] == "h2":
                out.append(f"## {b[1]}\n")
            elif b[0] == "p":
                out.append(f"{b[1]}\n")
            elif b[0] == "table":
                out.append("| " + " | ".join(b[1]) + " |")
                out.append("|" + "---|" * len(b[1]))
                out += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in b[2]]
                out.append("")
            elif b[0] == "img":
                rel = os.path.relpath(b[1], base)
                out.append(f"![{b[2]}]({rel})\n" + (f"*{b[2]}*\n" if b[2] else ""))
        return "\n".join(out)

    def html(self) -> str:
        out = ["<!doctype html><html><head><meta charset='utf-8'><title>jemtorch report</title><style>",
               "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}",
               "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}",
               "th{background:#eee}td:first-child{text-align:left}img{max-width:100%}figcaption{color:#555;font-size:90%}",
               "</style></head><body>"]
        for b in self.blocks:
            if b[0] in ("h1", "h2"):
                out.append(f"<{b[0]}>{html.escape(b[1])}</{b[0]}>")
            elif b[0] == "p":
                out.append(f"<p>{html.escape(b[1])}</p>")
            elif b[0] == "table":
                out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in b[1]) + "</tr>")
                for row in b[2]:
                    out.append("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>")
                out.append("</table>")
            elif b[0] == "img":
                data = base64.b64encode(Path(b[1]).read_bytes()).decode()
                out.append(f"<figure><img src='data:image/png;base64,{data}'><figcaption>{html.escape(b[2])}"
                           f"</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)

    def write(self, folder: Path) -> tuple[Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        md, ht = folder / "report.md", folder / "report.html"
        md.write_text(self.markdown(folder))
        ht.write_text(self.html())
        return md, ht


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return "—" if v is None else str(v)
