"""Reports: one list of blocks rendered both as ``report.md`` and a self-contained ``report.html``.

A report renders what it is handed (text, tables, figure paths); it computes and reads nothing."""
from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Sequence

from .checkpoint import write_atomic


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
        write_atomic(md, self.markdown(folder))
        write_atomic(ht, self.html())
        return md, ht


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return "—" if v is None else str(v)


def robustness_section(rep: Report, name: str, m: dict, figures: dict[str, Path]) -> None:
    """Render one run's robustness metrics (``RUN/robustness/metrics.json``) and figures (by file stem)."""
    rep.h2(f"Adversarial robustness: {name}")
    for norm in ("linf", "l2"):
        rows = [[d_name, norm, eps, acc] for d_name, d in m.get("defenses", {}).items()
                for eps, acc in d.get(norm, {}).items()]
        if rows:
            rep.table(["defence", "norm", "ε ([0,1] scale)", "robust accuracy"], rows)
            p = m.get("pgd", {}).get(norm, {})
            rep.p(f"PGD {norm}: {p.get('steps')} steps, step size {p.get('step_size')}, {p.get('restarts')} "
                  f"restart(s), random start, {p.get('n')} test images; gradients through the defence: "
                  f"{p.get('defense_grad')}.")
        if f"robust_{norm}" in figures:
            rep.img(figures[f"robust_{norm}"], f"Robust accuracy under PGD ({norm})")
    bb = m.get("blackbox", {})
    rows = [[b_name, r.get("norm"), r.get(f"median_{r.get('norm')}"), r.get("success_rate"), r.get("n")]
            for b_name, r in bb.items() if isinstance(r, dict)]
    if rows:
        rep.table(["gradient-free attack", "norm", "median perturbation ([0,1] scale)", "success rate", "images"], rows)
    for cls, d in m.get("distal", {}).items():
        rep.p(f"Distal adversarials, class {cls}: mean p(y|x) {d['mean_confidence']:.3f}, mean log p(x) "
              f"{d['mean_log_px']:.2f} (test data: {d.get('test_data_mean_log_px', float('nan')):.2f}).")
        if f"distal_class{cls}" in figures:
            rep.img(figures[f"distal_class{cls}"], f"Distal adversarials for class {cls}")
