"""The benchmark scripts run end to end (tiny settings: this checks the wiring, never a timing)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_recipes_benchmark_gives_the_baseline_the_longest_jems_epochs(tmp_path):
    out = tmp_path / "rec"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/recipes.py"), "--dataset", "digits", "--model", "cnn-4",
                        "--recipes", "jempp", "--time-limit", "0.5", "--out", str(out), "--", "--buffer-size", "200",
                        "--batch-size", "128", "--max-rollbacks", "0"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["run"]: row for row in json.loads((out / "recipes.json").read_text())["rows"]}
    jem, base = rows["jempp"], rows["baseline"]
    assert "failed" not in jem and 0 < jem["epochs"] < 60  # the time limit ended it (the preset has 60 epochs)
    assert base["epochs"] == -(-jem["epochs"] // 1)  # as many whole epochs as the JEM began
    assert set(jem["val_curve"]) == {str(e) for e in range(1, int(jem["epochs"]) + 1)}
    assert "| jempp | jempp |" in (out / "recipes.md").read_text()
    # probe_calibration.py reads the same runs back: the best-validation weights' accuracy on the validation split
    c = subprocess.run([sys.executable, str(ROOT / "benchmarks/probe_calibration.py"), str(out / "baseline")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert c.returncode == 0, c.stderr[-2000:]
    line = c.stdout.strip().splitlines()[-1]
    assert line.startswith(f"| {out / 'baseline'} | {100 * max(base['val_curve'].values()):.2f}% |"), line
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks/probe_calibration.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode != 0
    # probe_logp.py: log p(x) of the validation images, the buffer and synthetic sets, one row per run
    rows = []
    for extra in ([], ["--batch-stats"]):  # as evaluated (running averages), as the loss saw it (batch statistics)
        lp = subprocess.run([sys.executable, str(ROOT / "benchmarks/probe_logp.py"), str(out / "jempp"), "--n", "50",
                             *extra], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert lp.returncode == 0, lp.stderr[-2000:]
        cells = lp.stdout.strip().splitlines()[-1].strip("| ").split(" | ")
        assert cells[0] == str(out / "jempp") and len(cells) == 9 and all(" ± " in c for c in cells[1:8]), cells
        assert all(c.endswith(")") for c in cells[2:8]) and cells[8].endswith("%")  # (AUROC vs the data)
        rows.append(cells)
    assert rows[0][1] != rows[1][1]  # BatchNorm's statistics differ, so do the data's scores
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks/probe_logp.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error:"), bad.stderr[-500:]
