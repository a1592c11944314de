"""The benchmark scripts run end to end (tiny settings: this checks the wiring, never a timing). They run in this
process (``runpy``, as ``python benchmarks/<script>.py`` would), which saves a torch import per call."""
import json
import runpy
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def script(capsys, name: str, *args) -> SimpleNamespace:
    """Run benchmarks/<name> with ``args``; its exit code, stdout and stderr (sys.exit("...") prints to stderr)."""
    argv, path = sys.argv, list(sys.path)
    sys.argv = [str(ROOT / "benchmarks" / name), *map(str, args)]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    code, message = 0, ""
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        message = "" if isinstance(e.code, int) or e.code is None else str(e.code)
    finally:
        sys.argv, sys.path[:] = argv, path
    cap = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=cap.out, stderr=cap.err + message)


def test_recipes_benchmark_gives_each_recipe_its_own_baseline_for_its_epochs(tmp_path, capsys):
    out = tmp_path / "rec"
    r = script(capsys, "recipes.py", "--dataset", "digits", "--model", "cnn-4", "--recipes", "jempp", "sadajem",
               "--time-limit", "0.5", "--out", out, "--", "--buffer-size", "200", "--batch-size", "128",
               "--max-rollbacks", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["run"]: row for row in json.loads((out / "recipes.json").read_text())["rows"]}
    assert set(rows) == {"jempp", "sadajem", "jempp-baseline", "sadajem-baseline"}
    for recipe in ("jempp", "sadajem"):
        jem, base = rows[recipe], rows[f"{recipe}-baseline"]
        assert "failed" not in jem and 0 < jem["epochs"] < 60  # the time limit ended it (the preset has 60 epochs)
        assert base["epochs"] == -(-jem["epochs"] // 1)  # as many whole epochs as its JEM began
        assert set(jem["val_curve"]) == {str(e) for e in range(1, int(jem["epochs"]) + 1)}
        assert jem["baseline"] == f"{recipe}-baseline" and base["baseline"] is None
        saved = json.loads((out / f"{recipe}-baseline" / "config.json").read_text())
        assert saved["recipe"] == recipe and saved["p_x_weight"] == 0  # its recipe's optimiser, without p(x)
    sam = {k: json.loads((out / k / "config.json").read_text())["sam_rho"] for k in ("jempp-baseline", "sadajem-baseline")}
    assert sam["jempp-baseline"] == 0 < sam["sadajem-baseline"]  # SADA-JEM's SAM on both of its sides
    assert "| jempp | jempp |" in (out / "recipes.md").read_text()
    base = rows["jempp-baseline"]
    # probe_calibration.py reads the same runs back: the best-validation weights' accuracy on the validation split
    c = script(capsys, "probe_calibration.py", out / "jempp-baseline")
    assert c.returncode == 0, c.stderr[-2000:]
    line = c.stdout.strip().splitlines()[-1]
    assert line.startswith(f"| {out / 'jempp-baseline'} | {100 * max(base['val_curve'].values()):.2f}% |"), line
    bad = script(capsys, "probe_calibration.py", tmp_path)
    assert bad.returncode != 0
    # probe_logp.py: log p(x) of the validation images, the buffer and synthetic sets, one row per run
    rows = []
    for extra in (["--levels", "3"], ["--batch-stats"]):  # as evaluated (running averages), as the loss saw it
        lp = script(capsys, "probe_logp.py", out / "jempp", "--n", "50", *extra)
        assert lp.returncode == 0, lp.stderr[-2000:]
        lines = [ln for ln in lp.stdout.splitlines() if ln.startswith(f"| {out / 'jempp'} |")]
        assert len(lines) == (2 if extra[0] == "--levels" else 1), lp.stdout
        cells = lines[0].strip("| ").split(" | ")
        assert cells[0] == str(out / "jempp") and len(cells) == 9 and all(" ± " in c for c in cells[1:8]), cells
        assert all(c.endswith(")") for c in cells[2:8]) and cells[8].endswith("%")  # (AUROC vs the data)
        rows.append(cells)
        if extra[0] == "--levels":  # flat images at grey levels −1, 0, 1: log p(x) (share of the data below it)
            flat = lines[1].strip("| ").split(" | ")[1:]
            assert lp.stdout.count("| -1.00 | +0.00 | +1.00 |") == 1 and len(flat) == 3, lp.stdout
            assert all(0 <= float(c.split("(")[1].rstrip(")")) <= 1 for c in flat), flat
    assert rows[0][1] != rows[1][1]  # BatchNorm's statistics differ, so do the data's scores
    bad = script(capsys, "probe_logp.py", tmp_path)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error:"), bad.stderr[-500:]


def test_quality_benchmark_tables_and_reuse(tmp_path, capsys):
    """quality.py trains a JEM and its baseline, prints its tables (the paired ECE interval, the post-hoc columns, the
    samples' Fréchet distances), and reuses both runs when run again (evaluated, not trained)."""
    out, folder = tmp_path / "q", tmp_path / "my-ood"
    folder.mkdir()
    from PIL import Image

    for i in range(12):
        Image.fromarray((37 * i % 255) * __import__("numpy").ones((8, 8), "uint8")).save(folder / f"{i}.png")
    cmd = ["--dataset", "digits", "--seeds", "0", "--n", "60", "--n-gen", "40", "--sample-steps", "2",
           "--ood", f"uniform,constant,{folder}", "--out", out, "--", "--keep-epochs", "1", "--model", "cnn-4", "--epochs", "2",
           "--warmup-iters", "0", "--buffer-size", "100", "--sgld-steps", "1"]
    first = script(capsys, "quality.py", *cmd)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "[quality] seed0 jem" in first.stderr and "[quality] seed0 baseline" in first.stderr
    rows = json.loads((out / "quality.json").read_text())["rows"]
    runs = {r["run"]: r for r in rows["runs"]}
    jem, base = runs["jem"], runs["baseline"]
    assert jem["ece_vs_baseline"]["diff"] == pytest.approx(jem["ece"] - base["ece"]) and base["ece_vs_baseline"] is None
    lo, hi = jem["ece_vs_baseline"]["ci"]
    table = (out / "quality.md").read_text()
    assert "ECE − baseline's [95%]" in table and f"[{100 * lo:+.2f}, {100 * hi:+.2f}]" in table
    acc = jem["accuracy_vs_baseline"]  # the accuracy's paired interval beside it
    assert acc["diff"] == pytest.approx(jem["test_accuracy"] - base["test_accuracy"]) and base["accuracy_vs_baseline"] is None
    assert f"{100 * acc['diff']:+.2f} [{100 * acc['ci'][0]:+.2f}, {100 * acc['ci'][1]:+.2f}]" in table
    assert set(jem["auroc"]) == {"uniform", "constant", "my-ood"}  # a folder set is named by its folder
    assert [o["set"] for o in rows["ood"]] == ["uniform", "constant", "my-ood"]
    assert "best post-hoc on the baseline" in table and "chain starts (0 steps)" in table
    assert list(rows["samples"][0]["by_length"]) == ["0", "2"]  # on the way to --sample-steps 2: none below it
    assert rows["samples"][0]["by_length"]["2"]["fd"] == rows["samples"][0]["fd"]["fresh chains (2 steps)"]
    fd, floor = rows["samples"][0]["fd"], rows["samples"][0]["fd"]["real train (floor)"]
    line = table.split("| seed | chains ÷ starts | above the floor | FD∞ ÷ FD∞ |")[1].splitlines()[2].split("|")
    assert float(line[2]) == pytest.approx(fd["fresh chains (2 steps)"] / fd["chain starts (0 steps)"], abs=1e-3)
    assert float(line[3]) == pytest.approx((fd["fresh chains (2 steps)"] - floor) / (fd["chain starts (0 steps)"]
                                                                                    - floor), abs=1e-3)
    inf = rows["samples"][0]["fd_inf"]
    assert float(line[4]) == pytest.approx(inf["fresh chains (2 steps)"] / inf["chain starts (0 steps)"], abs=1e-3)
    assert 0 <= jem["healthy"] <= 1 and base["healthy"] is None
    assert 0 <= jem["overshoot"] <= 1 and base["overshoot"] is None  # health.py: chains below the data's energy
    logged = [json.loads(ln) for ln in (out / "seed0" / "jem" / "metrics.jsonl").read_text().splitlines()]
    last = [r["train_acc"] for r in logged if r.get("kind") == "train" and r["epoch"] > 1]  # epoch 2 of 2
    assert last and jem["train_accuracy"] == pytest.approx(sum(last) / len(last))
    assert "train acc (last epoch)" in table and f"{100 * jem['train_accuracy']:.2f}%" in table
    again = script(capsys, "quality.py", "--ood-only", *cmd)  # reused, the OOD table alone: the same figures
    assert again.returncode == 0 and "[quality]" not in again.stderr  # nothing trained twice
    rows2 = json.loads((out / "quality-ood.json").read_text())["rows"]
    assert rows2["runs"][0]["test_accuracy"] == jem["test_accuracy"] and "ece" not in rows2["runs"][0]
    assert [o["own_auroc"] for o in rows2["ood"]] == [o["own_auroc"] for o in rows["ood"]] and not rows2["samples"]
    verdicts = [o["verdict"] for o in rows["ood"]]  # jem eval's paired intervals, the same from the OOD-only path
    assert all(a in {"won", "lost", "tied"} for v in verdicts for a in v.split(" / "))
    assert [o["verdict"] for o in rows2["ood"]] == verdicts and [o["auroc_ci"] for o in rows2["ood"]] == [
        o["auroc_ci"] for o in rows["ood"]] and f"| {verdicts[0]} |" in table
    other = script(capsys, "quality.py", *cmd, "--lr", "0.5")
    assert other.returncode != 0 and "another configuration (lr)" in other.stderr  # never mixes configurations
    typo = script(capsys, "quality.py", *cmd[:-10], "--ood", "uniform,nosuch/folder", "--out", tmp_path / "t")
    assert typo.returncode != 0 and not (tmp_path / "t").exists()  # checked before anything is trained
    # --baseline-runs: a JEM on another network against the classifier trained above (copied in, not trained)
    cross = script(capsys, "quality.py", "--ood-only", "--baseline-runs", out,
                   *[tmp_path / "x" if c == out else c for c in cmd], "--model", "cnn-silu-4")
    assert cross.returncode == 0, cross.stderr[-2000:]
    assert "[quality] seed0 jem" in cross.stderr and "[quality] seed0 baseline" not in cross.stderr
    crossed = {r["run"]: r for r in json.loads((tmp_path / "x" / "quality-ood.json").read_text())["rows"]["runs"]}
    assert crossed["baseline"]["test_accuracy"] == base["test_accuracy"]
    assert json.loads((tmp_path / "x" / "seed0" / "jem" / "config.json").read_text())["model"] == "cnn-silu-4"
    other_root = tmp_path / "other"  # the same classifier but for one setting: --out already holds the first one
    shutil.copytree(out / "seed0" / "baseline", other_root / "seed0" / "baseline")
    saved = json.loads((other_root / "seed0" / "baseline" / "config.json").read_text())
    (other_root / "seed0" / "baseline" / "config.json").write_text(json.dumps({**saved, "lr": 0.5}))
    clash = script(capsys, "quality.py", "--ood-only", "--baseline-runs", other_root,
                   *[tmp_path / "x" if c == out else c for c in cmd], "--model", "cnn-silu-4")
    assert clash.returncode != 0 and "holds another classifier" in clash.stderr
    missing = script(capsys, "quality.py", "--baseline-runs", tmp_path / "nosuch",
                     *[tmp_path / "y" if c == out else c for c in cmd])
    assert missing.returncode != 0 and "not a trained run" in missing.stderr
    # --branch-from: another tail of the JEM above, trained from the epoch it kept (only the second epoch trained)
    branched = script(capsys, "quality.py", "--ood-only", "--baseline-runs", out, "--branch-from", out, "--from-epoch",
                      "1", *[tmp_path / "b" if c == out else c for c in cmd], "--px-stop-epoch", "1",
                      "--px-tail-scale", "0.5")
    assert branched.returncode == 0, branched.stderr[-2000:]
    assert "branching" in branched.stderr and "[quality] seed0 baseline" not in branched.stderr
    log = lambda d: [{k: v for k, v in json.loads(ln).items() if k != "time"}
                     for ln in (d / "seed0" / "jem" / "metrics.jsonl").read_text().splitlines()]
    a, b = log(out), log(tmp_path / "b")
    cut = next(i for i, r in enumerate(b) if r["kind"] == "resume")
    assert b[cut]["changed"]["px_tail_scale"] == [0.0, 0.5] and 0 < cut < len(a)
    assert b[:cut] == [r for r in a if r["step"] <= b[cut]["step"]][:cut] and b[cut + 1:] != a[cut:]
    stale = script(capsys, "quality.py", "--ood-only", "--baseline-runs", out, "--branch-from", tmp_path / "b",
                   "--from-epoch", "1", *[tmp_path / "c" if c == out else c for c in cmd])  # the source's tail stays
    assert stale.returncode != 0 and "differ from the benchmark's JEM in px_stop_epoch, px_tail_scale" in stale.stderr
    assert not (tmp_path / "c" / "seed0" / "jem").exists()


@pytest.mark.parametrize("flag,key,head", [("--baseline-pseudo-label", "pseudo_label_weight", "Pseudo-Label (weight 0.5)"),
                                           ("--baseline-vat", "vat_weight", "VAT (weight 0.5, eps 4)")])
def test_quality_semi_supervised_baseline_term_is_the_baselines_alone(tmp_path, capsys, flag, key, head):
    """--baseline-pseudo-label / --baseline-vat give the semi-supervised baseline its term and the JEM none; without
    --labels-per-class they are refused before anything is trained."""
    cmd = ["--dataset", "digits", "--seeds", "0", "--n", "40", "--ood", "uniform", "--ood-only", "--labels-per-class",
           "5", flag, "0.5", "--out", tmp_path / "q", "--", "--model", "cnn-4", "--epochs", "1",
           "--warmup-iters", "0", "--buffer-size", "100", "--sgld-steps", "1"]
    r = script(capsys, "quality.py", *cmd)
    assert r.returncode == 0, r.stderr[-2000:]
    conf = {k: json.loads((tmp_path / "q" / "seed0" / k / "config.json").read_text()) for k in ("jem", "baseline")}
    assert conf["baseline"][key] == 0.5 and conf["jem"][key] == 0.0
    assert f"baseline with {head}" in (tmp_path / "q" / "quality-ood.md").read_text()
    bad = script(capsys, "quality.py", *[c for c in cmd if c not in ("--labels-per-class", "5")])
    assert bad.returncode != 0 and "needs --labels-per-class" in bad.stderr


def test_quality_flags_read_a_config_file_under_the_explicit_flags(tmp_path, monkeypatch):
    """``-- --config FILE`` is layered as `jem train` layers it: the file's entries, explicit flags above them."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from quality import train_flags

    (tmp_path / "c.toml").write_text('p_x_weight = 0.3\nsgld_steps = 5\nnorm = "none"\n')
    flags = train_flags(["--config", str(tmp_path / "c.toml"), "--sgld-steps", "7"])
    assert flags["p_x_weight"] == 0.3 and flags["norm"] == "none" and flags["sgld_steps"] == 7
    assert "config" not in flags


@pytest.mark.parametrize("name, args, row, others", [
    ("probe_ascent.py", ("--lengths", "1,2", "--bandwidths", "1,0.5", "--centres", "50"), "(log p, PNG, rise2)",
     ("| −rise1 alone |", "| (log p, PNG, margin) |", "| (log p, PNG, rise2, margin) |", "| (log p, PNG, rise2) h×0.5 |")),
    ("probe_msma.py", ("--sigmas", "0.1,0.3", "--chain", "1,2"), "(log p, PNG, drop0.3)",
     ("| MSMA: ‖∇‖ at every σ |", "| cos0.1 alone |", "| (log p, PNG, chain rise2) |")),
    ("probe_logits.py", (), "max − mean", ("| max p(y|x) |", "| MaxLogit |", "| −entropy |")),
    ("probe_complexity.py", ("--compressors", "png,webp", "--centres", "50"), "(log p, webp, rise)",
     ("| png alone |", "| (log p, png) |", "| (log p, png, rise) |")),
])
def test_probes_of_the_energy_table_every_combination_on_a_trained_run(trained_runs, capsys, name, args, row, others):
    """The ascent, multiscale, logits' and compressors' probes read a run (never change it) and print AUROC (FPR95) per
    combination (or score) and OOD set."""
    before = sorted(p.name for p in (trained_runs / "jem").iterdir())
    r = script(capsys, name, trained_runs / "jem", "--ood", "uniform,constant", "--n", "40", "--n-fit", "60", *args)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith(f"| {row} |")]
    assert len(rows) == 1 and all(0 <= float(c.split()[0]) <= 1 for c in rows[0].split("|")[2:4])
    assert all(o in r.stdout for o in others) and "| uniform | constant |" in r.stdout.splitlines()[0]
    assert sorted(p.name for p in (trained_runs / "jem").iterdir()) == before


def test_probe_shift_splits_log_p_into_the_logits_mean_and_the_confidence(trained_runs, capsys, tmp_path):
    """probe_shift.py reads runs (never changes them): per run a table of the parts' medians and AUROC per OOD set,
    the buffer's row where the run keeps one, a figure; a checkpoint named with @ must be a file in the run's
    directory."""
    before = sorted(p.name for p in (trained_runs / "jem").iterdir())
    r = script(capsys, "probe_shift.py", f"JEM={trained_runs / 'jem'}", trained_runs / "base", "--ood", "uniform", "--n", "40",
               "--out", tmp_path / "parts.png")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "parts.png").stat().st_size > 0 and r.stdout.count("| test |") == 2
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| uniform |")]
    assert len(rows) == 2 and all(0 <= float(v) <= 1 for row in rows for v in row[4].split(" / "))
    tests = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| test |")]
    assert -1 <= float(tests[0][5]) <= 1  # the JEM's shift and the test images' lengths vary
    assert any(line.startswith("| buffer |") for line in r.stdout.splitlines())  # the JEM keeps one
    assert sorted(p.name for p in (trained_runs / "jem").iterdir()) == before
    for bad in ("missing.pt", "../base/checkpoint.pt"):
        r = script(capsys, "probe_shift.py", f"{trained_runs / 'jem'}@{bad}", "--ood", "uniform", "--n", "10")
        assert r.returncode != 0 and "no checkpoint file" in r.stderr


def test_ood_verdicts_scores_trained_pairs_again_without_training(trained_runs, capsys, tmp_path):
    """ood_verdicts.py reads QUALITY_OUT/seed<S>/{jem,baseline} as trained: quality.py's OOD table per label with a
    verdict per set, every row in --out; a folder without such pairs is a one-line error."""
    for kind, src in (("jem", "jem"), ("baseline", "base")):
        shutil.copytree(trained_runs / src, tmp_path / "q" / "seed3" / kind)
    r = script(capsys, "ood_verdicts.py", f"tiny={tmp_path / 'q'}", "--ood", "uniform,constant", "--n", "40",
               "--out", tmp_path / "v.json")
    assert r.returncode == 0, r.stderr
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| 3 |")]
    assert [c[1].strip() for c in rows] == ["uniform", "constant"] and all("/" in c[7] for c in rows)
    saved = json.loads((tmp_path / "v.json").read_text())["tiny"]
    assert [(o["seed"], o["set"]) for o in saved] == [(3, "uniform"), (3, "constant")]
    (tmp_path / "none").mkdir()
    r = script(capsys, "ood_verdicts.py", f"x={tmp_path / 'none'}", "--ood", "uniform")
    assert r.returncode != 0 and "no seed<S>/jem and seed<S>/baseline runs" in r.stderr


def test_accuracy_verdicts_pairs_each_jem_with_its_baseline_on_the_test_set(trained_runs, capsys, tmp_path):
    """accuracy_verdicts.py: each seed's JEM − baseline test accuracy with a paired interval and a verdict; the
    accuracies are the runs' own (summary.json); a folder without pairs is a one-line error."""
    for kind, src in (("jem", "jem"), ("baseline", "base")):
        shutil.copytree(trained_runs / src, tmp_path / "q" / "seed3" / kind, ignore=shutil.ignore_patterns("eval"))
    r = script(capsys, "accuracy_verdicts.py", f"tiny={tmp_path / 'q'}", "--n-boot", "200")
    assert r.returncode == 0, r.stderr
    row = next(line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| tiny | 3 |"))
    acc = [json.loads((tmp_path / "q" / "seed3" / k / "summary.json").read_text())["test_accuracy"]
           for k in ("jem", "baseline")]
    assert [float(c.strip().rstrip("%")) for c in row[2:4]] == pytest.approx([100 * a for a in acc], abs=0.006)
    diff, lo, hi = (float(v) for v in row[4].replace("[", "").replace("]", "").replace(",", "").split())
    assert lo <= diff <= hi and diff == pytest.approx(100 * (acc[0] - acc[1]), abs=0.006)
    assert row[5].strip() == ("won" if lo > 0 else "lost" if hi < 0 else "tied")
    (tmp_path / "none").mkdir()
    r = script(capsys, "accuracy_verdicts.py", f"x={tmp_path / 'none'}")
    assert r.returncode != 0 and "no seed<S>/jem and seed<S>/baseline runs" in r.stderr


def test_probe_interp_splits_interpolations_by_same_and_different_class_pairs(trained_runs, capsys):
    """probe_interp.py reads a JEM and its baseline (never changes them): one row per score, AUROC over all
    interpolations and over each kind of pair; the split is counted in the header."""
    before = sorted(p.name for p in (trained_runs / "jem").iterdir())
    r = script(capsys, "probe_interp.py", trained_runs / "jem", trained_runs / "base", "--n", "60", "--n-fit", "60")
    assert r.returncode == 0, r.stderr
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| jem |") or
            line.startswith("| base |")]
    assert [c[1].strip() for c in rows] == ["logp", "complexity", "ascent", "maxprob",
                                            "vim", "knn", "mahalanobis", "logp", "maxlogit", "react"]
    assert all(0 <= float(v) <= 1 for c in rows for v in c[2:])  # both kinds of pair drawn here
    same = int(r.stdout.split(" of them of two images of one class")[0].split(", ")[-1])
    assert 0 < same < 60  # 10 classes: about one pair in ten shares one
    assert sorted(p.name for p in (trained_runs / "jem").iterdir()) == before


def test_probe_step_tables_fresh_chains_and_the_continued_buffer(trained_runs, capsys):
    """probe_step.py reads a run and a reference (never changes them): one row per variant and the buffer's row."""
    before = sorted(p.name for p in (trained_runs / "jem").iterdir())
    r = script(capsys, "probe_step.py", trained_runs / "jem", trained_runs / "base", "--steps", "0.5",
               "--caps", "0.01", "--noises", "0.02", "--buffer", "--energy-stop", "--n", "20", "--lengths", "1,2")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "steps |" not in line]
    names = [row.split("|")[1].strip() for row in rows]
    assert names[:4] == [
        "the replay buffer, continued (as trained)", "fresh, α 0.5", "fresh, α 1, cap 0.01", "fresh, α 1, noise σ 0.02"]
    assert names[4].startswith("fresh, stopped at the median training energy") and names[5] == (
        "fresh, stopped at the one training image's energy per chain")
    assert all(len(row.split("|")) == 6 for row in rows)  # name, starts, 1 and 2 steps
    assert sorted(p.name for p in (trained_runs / "jem").iterdir()) == before
    bad = script(capsys, "probe_step.py", trained_runs / "jem", trained_runs / "base", "--lengths", "0")
    assert bad.returncode != 0 and "--lengths" in bad.stderr
    none = script(capsys, "probe_step.py", trained_runs / "base", trained_runs / "base", "--buffer", "--n", "20")
    assert none.returncode != 0 and "no replay buffer" in none.stderr


def test_tradeoff_places_each_seed_by_accuracy_and_samples(tmp_path, capsys):
    """tradeoff.py reads quality.json: accuracy − baseline in points, the longest chain's FD ÷ the starts', MNIST's
    verdict, both lines met or not; a label given twice pools its runs; a directory without a benchmark is a one-line
    error."""
    def quality(name, seed, jem, base, fds, verdict):
        (tmp_path / name).mkdir()
        rows = {"runs": [{"seed": seed, "run": "jem", "test_accuracy": jem},
                         {"seed": seed, "run": "baseline", "test_accuracy": base}],
                "ood": [{"seed": seed, "set": "mnist", "verdict": verdict}],
                "samples": [{"seed": seed, "by_length": {k: {"fd": v} for k, v in fds.items()}}]}
        (tmp_path / name / "quality.json").write_text(json.dumps({"header": "", "rows": rows}))
        return tmp_path / name
    a = quality("a", 0, 0.905, 0.910, {"0": 40.0, "40": 16.0, "200": 18.0}, "won / tied")
    b = quality("b", 1, 0.890, 0.905, {"0": 50.0, "200": 30.0}, "lost / tied")
    r = script(capsys, "tradeoff.py", f"L={a}", f"L={b}", "--out", tmp_path / "t.png")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[2] == "| L | 0 | -0.50 | 0.450 (200 steps) | won / tied | yes |"
    assert lines[3] == "| L | 1 | -1.50 | 0.600 (200 steps) | lost / tied | no |"
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "empty").mkdir()
    missing = script(capsys, "tradeoff.py", f"E={tmp_path / 'empty'}")
    assert missing.returncode != 0 and "no finished quality benchmark" in missing.stderr
    bad = script(capsys, "tradeoff.py", str(a))
    assert bad.returncode != 0 and "LABEL=QUALITY_OUT" in bad.stderr


def test_fd_curves_tables_each_runs_ratios_and_draws_them(tmp_path, capsys):
    """fd_curves.py divides each chain length's FD by the starts' (from jem eval's metrics) and draws one figure; a run
    that was not evaluated is a one-line error."""
    runs = {}
    for name, fds in {"a": {"0": 40.0, "5": 30.0, "200": 20.0}, "b": {"0": 50.0, "40": 20.0}}.items():
        (tmp_path / name / "eval").mkdir(parents=True)
        by_length = {k: {"fd": v, "accuracy": 1.0} for k, v in fds.items()}
        (tmp_path / name / "eval" / "metrics.json").write_text(json.dumps({"generation": {"fd_by_chain_length": by_length}}))
        runs[name] = tmp_path / name
    r = script(capsys, "fd_curves.py", f"A={runs['a']}", f"B={runs['b']}", "--out", tmp_path / "fd.png")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "| run | 0 steps | 5 steps | 40 steps | 200 steps |"
    assert lines[2] == "| A | 1.00 | 0.75 | — | 0.50 |" and lines[3] == "| B | 1.00 | — | 0.40 | — |"
    assert (tmp_path / "fd.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "c").mkdir()
    missing = script(capsys, "fd_curves.py", f"C={tmp_path / 'c'}")
    assert missing.returncode != 0 and "jem eval" in missing.stderr
    bad = script(capsys, "fd_curves.py", str(runs["a"]))
    assert bad.returncode != 0 and "LABEL=RUN_DIR" in bad.stderr


def test_sample_draws_repeats_the_benchmarks_sample_measure_on_independent_draws(trained_runs, capsys, tmp_path):
    """sample_draws.py reads a run and a reference (never changes them): one row per draw, a draw seed given twice
    is the same draw, each row has its floor and the ratio above it, and the summary line is the draws' mean ratio;
    a step cap a chain cannot take is refused. draws_figure.py tables and draws either ratio of that output."""
    before = sorted(p.name for p in (trained_runs / "jem").iterdir())
    r = script(capsys, "sample_draws.py", trained_runs / "jem", trained_runs / "base", "--draws", "1,2,1",
               "--n-gen", "20", "--sample-steps", "2", "--sample-step-cap", "0.01", "--figure", tmp_path / "inf.png")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "inf.png").stat().st_size > 0
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| ") and "draw" not in line
            and not line.startswith("|---")]
    assert [int(c[0]) for c in rows] == [1, 2, 1] and rows[0][1:4] == rows[2][1:4] and rows[0][1:3] != rows[1][1:3]
    ratios = [float(c[3]) for c in rows]
    for c, q in zip(rows, ratios):  # the ratio is the chains' FD over the starts' (both printed to 0.05)
        fd0, fd, floor = float(c[1]), float(c[2]), float(c[4])
        assert abs(fd / fd0 - q) <= 0.05 / fd0 * (1 + fd / fd0) + 1e-3 and 0 < floor
        assert len(c) == 12 and (float(c[5]) < 1) == (fd < fd0)  # above the floor: (fd − floor) / (fd0 − floor)
        inf0, inf, inf_floor = float(c[6]), float(c[7]), float(c[9])  # FD∞: the bias extrapolated away
        assert inf0 < fd0 and inf_floor < floor and abs(inf / inf0 - float(c[8])) <= 0.05 / inf0 * (1 + inf / inf0) + 1e-3
    mean = float(r.stdout.split("ratio over 3 draws: ")[1].split()[0])
    assert abs(mean - sum(ratios) / 3) < 2e-3 and "the sample line 0.5: " in r.stdout
    (tmp_path / "a.log").write_text(r.stdout)  # draws_figure.py reads that output back: a label twice pools
    f = script(capsys, "draws_figure.py", f"a={tmp_path / 'a.log'}", f"a={tmp_path / 'a.log'}",
               f"b={tmp_path / 'a.log'}", "--out", tmp_path / "d.png")
    assert f.returncode == 0, f.stderr
    table = {c[1].strip(): c[2:] for c in (line.split("|") for line in f.stdout.splitlines()[2:])}
    assert [c[0].strip() for c in table.values()] == ["6", "3"] and (tmp_path / "d.png").stat().st_size > 0
    assert abs(float(table["a"][1].split(" ± ")[0]) - mean) < 2e-3
    for reading, k in (("above-floor", 5), ("fd-inf", 8)):
        above = script(capsys, "draws_figure.py", f"a={tmp_path / 'a.log'}", "--reading", reading)
        assert above.returncode == 0 and abs(float(above.stdout.splitlines()[2].split("|")[3].split(" ± ")[0]) - sum(
            float(c[k]) for c in rows) / 3) < 2e-3
    (tmp_path / "old.log").write_text(r.stdout.replace("| floor: training images' FD | ratio above the floor ", ""))
    old = script(capsys, "draws_figure.py", f"a={tmp_path / 'old.log'}", "--reading", "above-floor")
    assert old.returncode != 0 and "no column 'ratio above the floor'" in old.stderr
    (tmp_path / "bad.log").write_text("no table\n")
    bad = script(capsys, "draws_figure.py", f"a={tmp_path / 'bad.log'}")
    assert bad.returncode != 0 and "no table of sample_draws.py" in bad.stderr
    assert sorted(p.name for p in (trained_runs / "jem").iterdir()) == before
    bad = script(capsys, "sample_draws.py", trained_runs / "jem", trained_runs / "base", "--sample-step-cap", "0")
    assert bad.returncode != 0 and "--sample-step-cap" in bad.stderr


def test_fd_floor_prints_the_estimators_bias_and_fd_infinity(trained_runs, capsys):
    """fd_floor.py: training against test images in a run's features — the FD of m per size with m × FD, then FD
    and FD∞ per n, each over the asked repeats; a size below 8 images is refused in one line."""
    r = script(capsys, "fd_floor.py", trained_runs / "base", "--sizes", "12,24", "--n", "24", "--repeats", "2")
    assert r.returncode == 0, r.stderr
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| ") and "FD" not in line
            and not line.startswith("|---")]
    assert [int(c[0]) for c in rows] == [12, 24, 24]
    for c in rows[:2]:
        assert abs(int(c[0]) * float(c[1].split(" ± ")[0]) - float(c[2])) <= int(c[0]) * 0.005 + 0.5
    assert float(rows[2][2].split(" ± ")[0]) < float(rows[2][1].split(" ± ")[0])  # FD∞ below the FD of n
    bad = script(capsys, "fd_floor.py", trained_runs / "base", "--sizes", "4")
    assert bad.returncode != 0 and "at least 8 images" in bad.stderr
