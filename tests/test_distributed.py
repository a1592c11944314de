"""torch.distributed training on CPU (gloo), launched as users launch it: torchrun ... -m jemtorch train."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import jemtorch
from jemtorch.build import load_run
from jemtorch.checkpoint import load_safe
from jemtorch.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "cnn-4", "--sgld-steps", "2", "--buffer-size", "100", "--no-progress", "--lr", "0.01",
        "--warmup-iters", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc=2, extra=(), wait=True, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *extra]
    if not extra:
        cmd += ["--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    cmd += ["-m", "jemtorch", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def kill_all(marker: str) -> None:
    """SIGKILL every process whose command line mentions ``marker``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def summary(run):
    return json.loads((run / "summary.json").read_text())


def test_two_ranks_equal_one_rank_with_twice_the_batch(tmp_path):
    """Disjoint shards + DDP's gradient mean: 2 ranks × batch 32 train the baseline exactly like 1 × batch 64."""
    args = [*TINY, "--p-x-weight", "0", "--no-augment", "--data-noise", "0", "--epochs", "1"]
    assert main(["train", *args, "--batch-size", "64", "--out", str(tmp_path / "one")]) == 0
    torchrun([*args, "--batch-size", "32", "--out", str(tmp_path / "two")])
    one, two = summary(tmp_path / "one"), summary(tmp_path / "two")
    assert two["world_size"] == 2 and two["global_batch"] == 64 and two["ranks_in_sync"] is True
    assert one["iterations"] == two["iterations"] == 20
    assert one["test_accuracy"] == pytest.approx(two["test_accuracy"], abs=1 / 360)  # at most one image apart
    assert one["test_nll"] == pytest.approx(two["test_nll"], rel=1e-4)
    a, b = (load_safe(tmp_path / r / "checkpoint.pt")["model"] for r in ("one", "two"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k  # float sums in another order: tolerance, not equality


def test_jem_on_two_nodes_shares_weights_not_buffers_and_rolls_back_together(tmp_path):
    """Two nodes of one process each (the multi-node launch, rendezvous on localhost): a JEM whose ranks keep their
    own buffers, roll back together after a divergence injected on rank 0, and resume in one process. With the
    gradient penalty on: its double backward pass goes through the DDP wrapper and the ranks stay in sync."""
    port, run = free_port(), tmp_path / "jem"
    common = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=jemtest"]
    args = [*TINY, "--epochs", "2", "--batch-size", "32", "--inject-divergence", "25", "--grad-penalty", "0.1",
            "--out", str(run)]
    nodes = [torchrun(args, nproc=1, extra=[*common, f"--node-rank={i}"], wait=False) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in nodes]
    for p, (_, err) in zip(nodes, outs):
        assert p.returncode == 0, err[-3000:]
    s = summary(run)
    assert s["world_size"] == 2 and s["ranks_in_sync"] is True and s["rollbacks"] == 1  # injected on rank 0 alone
    ck = load_safe(run / "checkpoint.pt")
    b0, b1 = ck["ranks"]["buffers"]
    assert b0["data"].shape == b1["data"].shape == (50, 1, 8, 8)  # buffer_size split across ranks
    assert not torch.equal(b0["data"], b1["data"])
    assert len(ck["buffer"]["data"]) == 100
    log = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "rollback" for r in log) == 1  # rank 0 alone writes the log
    err = "".join(e for _, e in outs)
    assert err.count("jem train: digits") == 1 and err.count("divergence at iteration 25") == 1  # and prints
    # the 2-process checkpoint resumes in one process: chains dealt out again, with a message
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    assert summary(run)["world_size"] == 1


def test_killed_two_rank_run_resumes_exactly(tmp_path):
    args = [*TINY, "--epochs", "3", "--batch-size", "32", "--log-every", "1"]
    torchrun([*args, "--out", str(tmp_path / "full")])
    run = tmp_path / "cut"
    proc = torchrun([*args, "--out", str(run)], wait=False)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the epoch-1 checkpoint, then kill everything at once
        if (run / "checkpoint.pt").exists() and (run / "metrics.jsonl").read_text().count('"eval"') >= 1:
            break
        time.sleep(0.02)
    kill_all(str(run))  # the launcher and its workers (they run in sessions of their own)
    proc.communicate()
    assert not (run / "summary.json").exists()
    step = load_safe(run / "checkpoint.pt")["step"]
    assert 0 < step < 60
    torchrun(["--resume", str(run), "--no-progress"])
    a, b = (load_safe(tmp_path / r / "checkpoint.pt") for r in ("full", "cut"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for ra, rb in zip(a["ranks"]["buffers"], b["ranks"]["buffers"]):
        assert torch.equal(ra["data"], rb["data"])
    assert summary(tmp_path / "full")["test_accuracy"] == summary(run)["test_accuracy"]


def test_speed_settings_train_and_keep_plain_checkpoints(tmp_path):
    run = tmp_path / "fast"
    assert main(["train", *TINY, "--epochs", "1", "--amp", "bf16", "--channels-last", "--out", str(run)]) == 0
    assert summary(run)["iterations"] == 20
    ck = load_safe(run / "checkpoint.pt")
    assert ck["model"]["features.0.weight"].dtype == torch.float32  # weights stay fp32 under autocast
    assert ck["buffer"]["data"].dtype == torch.float32  # and so do the chains
    # --compile compiles the network in place: its parameter names (and so checkpoints) stay the plain network's
    from jemtorch import create_model

    net = create_model("cnn-4", in_channels=1, num_classes=10)
    names = list(net.state_dict())
    net.compile()
    assert list(net.state_dict()) == names == list(ck["model"])
    assert main(["train", *TINY, "--amp", "fp8", "--out", str(tmp_path / "bad")]) == 2


def test_training_on_the_cpu_flushes_subnormal_floats(tmp_path):
    """An over-confident softmax underflows into subnormals, an order of magnitude slower on x86 CPUs: training and
    loading a run or an export flush them to zero (a setting of the process, as TF32 is on CUDA)."""
    tiny = lambda: (torch.tensor(1e-30) * torch.tensor(1e-10)).item()  # noqa: E731 — 1e-40 is subnormal in float32
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        assert tiny() > 0
        assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
        assert tiny() == 0
        torch.set_flush_denormal(False)  # and so do the commands that read a run (eval, attack, distal, score)
        load_run(tmp_path / "run", device="cpu")
        assert tiny() == 0
        assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exp")]) == 0
        torch.set_flush_denormal(False)  # and loading an export (jem score, jemtorch.load)
        jemtorch.load(tmp_path / "exp", device="cpu")
        assert tiny() == 0
    finally:
        torch.set_flush_denormal(False)
