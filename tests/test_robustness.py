import json

import pytest
import torch
from torch import nn

from jemtorch import JEM, create_model
from jemtorch.attacks import Refined, parse_eps, pgd, steepness
from jemtorch.cli import main


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_pgd_stays_in_eps_ball_and_valid_range(norm, eps):
    torch.manual_seed(0)
    model = JEM(create_model("cnn-4", in_channels=1, num_classes=10))
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    x[:, :, :2] = 1.0  # saturated pixels: the range clamp must bind there
    y = torch.randint(0, 10, (16,))
    adv = pgd(model, x, y, eps, norm, steps=10, restarts=2)
    d = (adv - x).flatten(1)
    size = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert adv.min() >= -1 and adv.max() <= 1
    assert (size > 0.5 * eps).any()  # it moved
    loss = lambda z: nn.functional.cross_entropy(model(z), y, reduction="none")
    assert loss(adv).mean() > loss(x).mean()


def test_linf_attack_on_linear_model_matches_closed_form():
    """For logits (0, w·x), label 0, the worst L∞ perturbation is eps·sign(w): margin drops by eps·||w||₁."""
    torch.manual_seed(0)
    w = torch.randn(16)
    lin = nn.Linear(16, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([torch.zeros(16), w]))
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.rand(8, 1, 4, 4) * 0.5 - 0.25  # interior: the [-1, 1] clamp never binds
    x = torch.where((x.flatten(1) @ w > 0).view(-1, 1, 1, 1), -x, x)  # all classified right (0) before the attack
    y = torch.zeros(8, dtype=torch.long)
    eps = 0.1
    adv = pgd(model, x, y, eps, "linf", steps=20, restarts=1)
    torch.testing.assert_close(adv, x + eps * w.sign().view(1, 1, 4, 4))
    margin = lambda z: model(z)[:, 1] - model(z)[:, 0]
    torch.testing.assert_close(margin(adv), margin(x) + eps * w.abs().sum())


def test_steepness_of_a_linear_model_matches_closed_form():
    """Logits W·x: the first-order boundary distance (f1 − f2) / ‖w1 − w2‖ is exact, and ∇ₓE = −Σ_y p(y|x) w_y."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 3, bias=False)
    jem = JEM(nn.Sequential(nn.Flatten(), lin))
    x = torch.rand(40, 1, 4, 4) * 2 - 1
    out = steepness(jem, x, batch_size=7)
    w, z = lin.weight.detach(), lin(x.flatten(1)).detach()
    top = z.topk(2, dim=1).indices
    dist = (z.gather(1, top[:, :1]) - z.gather(1, top[:, 1:])).squeeze(1) / (w[top[:, 0]] - w[top[:, 1]]).norm(dim=1)
    grad_e = -(z.softmax(1) @ w)
    assert out["n"] == 40
    assert out["boundary_l2"] == pytest.approx(dist.median().item() / 2, rel=1e-5)  # model units → [0, 1] units
    assert out["energy_grad_rms"] == pytest.approx(grad_e.pow(2).mean(1).sqrt().median().item(), rel=1e-5)
    jem.f[1].weight.data *= 10  # ten times steeper: ten times the gradient, the same distance
    assert steepness(jem, x)["boundary_l2"] == pytest.approx(out["boundary_l2"], rel=1e-4)


def test_pgd_never_turns_a_wrong_answer_right():
    """An image the model gets wrong stays an adversarial: the random start must not make it count as robust. The
    model is wrong only at 0 and right everywhere else, so any random start inside the ball would be 'correct'."""
    def model(z):  # class 0 within radius 0.01 of the origin, class 1 elsewhere
        return torch.stack([1e-4 - z.flatten(1).pow(2).sum(1), torch.zeros(len(z))], 1) * 100

    x, y = torch.zeros(8, 1, 2, 2), torch.ones(8, dtype=torch.long)
    for norm, steps in (("linf", 0), ("linf", 1), ("l2", 0)):
        adv = pgd(model, x, y, 0.5, norm, steps=steps)
        assert (model(adv).argmax(1) != y).all() and torch.equal(adv, x), (norm, steps)
    assert (model(x + 0.1).argmax(1) == y).all()  # the ball around it is classified right


def test_zero_refinement_equals_plain_classification():
    torch.manual_seed(0)
    lin = nn.Linear(64, 10)
    nn.init.normal_(lin.weight, std=0.5)
    jem = JEM(nn.Sequential(nn.Flatten(), lin)).eval()
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(Refined(jem, n_steps=0)(x), jem(x).log_softmax(1))
    # refinement with zero noise and chains that cannot differ: same as one chain
    one = Refined(jem, n_steps=3, n_chains=1, step_size=0.1, noise=0.0)(x)
    torch.testing.assert_close(Refined(jem, n_steps=3, n_chains=4, step_size=0.1, noise=0.0)(x), one)
    assert (one - jem(x).log_softmax(1)).abs().max() > 0.1  # refinement did change the prediction
    for grad in ("full", "bpda"):  # the run's --sgld-step-cap holds the defence's chains as it holds the sampler's
        capped = Refined(jem, n_steps=3, step_size=0.1, noise=0.0, grad=grad, step_cap=1e-6)(x)
        assert (capped - jem(x).log_softmax(1)).abs().max() < 1e-3


@pytest.mark.parametrize("grad", ["full", "bpda"])
def test_attack_gets_gradients_through_the_defence(grad):
    torch.manual_seed(0)
    jem = JEM(create_model("cnn-4", in_channels=1, num_classes=10)).eval()
    x = (torch.rand(4, 1, 8, 8) * 2 - 1).requires_grad_(True)
    out = Refined(jem, n_steps=2, n_chains=2, grad=grad)(x)
    (g,) = torch.autograd.grad(out[:, 0].sum(), x)
    assert g.abs().sum() > 0
    with torch.no_grad():  # scoring the adversarial images afterwards: the chains still get their gradients
        scored = Refined(jem, n_steps=2, n_chains=2, grad=grad)(x.detach())
    assert torch.isfinite(scored).all() and scored.shape == (4, 10)


def test_parse_eps():
    assert parse_eps("0, 8/255,0.5") == [0.0, 8 / 255, 0.5]
    for bad in ("a", "-1", "", "1/0"):
        with pytest.raises(ValueError):
            parse_eps(bad)


def test_attack_cli_end_to_end(trained_runs, capsys):
    jem, base = str(trained_runs / "jem"), str(trained_runs / "base")
    args = ["--n", "24", "--steps", "3", "--refine-steps", "0,2", "--refine-chains", "2", "--no-progress"]
    assert main(["attack", jem, base, "--norm", "linf", "--eps", "0,8/255", *args]) == 0
    assert "base is a classifier baseline, attacked without the SGLD-refinement defence" in capsys.readouterr().err
    assert main(["attack", jem, base, "--norm", "l2", "--eps", "0,0.5", *args]) == 0
    m = json.loads((trained_runs / "jem/robustness/metrics.json").read_text())
    assert set(m["linf"]) == {"0", f"{8 / 255:.6g}"} and set(m["l2"]) == {"0", "0.5"}
    assert set(m["defenses"]) == {"none", "sgld-2x2-full"}
    assert all(0 <= a <= 1 for a in m["linf"].values())
    assert m["linf"][f"{8 / 255:.6g}"] <= m["linf"]["0"]
    b = json.loads((trained_runs / "base/robustness/metrics.json").read_text())
    assert set(b["defenses"]) == {"none"}
    for f in ("robust_linf.png", "robust_l2.png", "report.html", "report.md"):
        assert (trained_runs / "jem/robustness" / f).is_file()


def test_blackbox_attacks_and_what_a_rerun_keeps(trained_runs):
    """The gradient-free attacks run; --blackbox alone keeps the earlier PGD results, and a second black-box attack
    keeps the first's."""
    pytest.importorskip("foolbox")
    pytest.importorskip("torchattacks")
    jem = str(trained_runs / "jem")
    assert main(["attack", jem, "--norm", "linf", "--eps", "0,2/255", "--n", "8", "--steps", "2", "--no-progress"]) == 0
    assert main(["attack", jem, "--n", "8", "--blackbox", "boundary,pointwise", "--boundary-steps", "20",
                 "--no-progress"]) == 0
    assert main(["attack", jem, "--n", "8", "--blackbox", "square", "--square-queries", "20", "--no-progress"]) == 0
    m = json.loads((trained_runs / "jem/robustness/metrics.json").read_text())
    bb = m["blackbox"]
    assert bb["n_correct"] > 0 and {"boundary", "pointwise", "square"} <= set(bb)
    assert bb["pointwise"]["norm"] == "l0" and bb["boundary"]["norm"] == "l2"
    assert set(m["linf"]) == {"0", f"{2 / 255:.6g}"}


def test_distal_cli(trained_runs):
    assert main(["distal", str(trained_runs / "jem"), str(trained_runs / "base"), "--class", "3", "--n", "4", "--steps", "5"]) == 0
    m = json.loads((trained_runs / "base/robustness/metrics.json").read_text())["distal"]["3"]
    assert len(m["confidence"]) == 4 and all(0 <= c <= 1 for c in m["confidence"])
    assert (trained_runs / "jem/robustness/distal_class3.png").is_file()


@pytest.mark.parametrize("argv,msg", [
    (["attack", "{jem}", "--norm", "l1"], "--norm must be linf or l2"),
    (["attack", "{jem}", "--eps", "x"], "--eps must be"),
    (["attack", "{jem}", "--blackbox", "hsj"], "unknown black-box attack"),
    (["attack", "{jem}", "--defense-grad", "magic", "--refine-steps", "1", "--eps", "0"], "--defense-grad"),
    (["attack", "/nonexistent/run"], "not a run directory"),
    (["distal", "{jem}", "--class", "10"], "--class must be in 0..9"),
])
def test_attack_bad_inputs(trained_runs, capsys, argv, msg):
    argv = [a.replace("{jem}", str(trained_runs / "jem")) for a in argv]
    assert main(argv + ["--no-progress"] * (argv[0] == "attack")) == 2
    assert msg in capsys.readouterr().err


def test_attack_rerun_replaces_that_norm(trained_runs):
    jem = str(trained_runs / "jem")
    common = ["--n", "8", "--steps", "2", "--no-progress"]
    assert main(["attack", jem, "--norm", "linf", "--eps", "0,4/255", "--refine-steps", "0,1", "--refine-chains", "1",
                 *common]) == 0
    assert main(["attack", jem, "--norm", "l2", "--eps", "0,1", *common]) == 0
    assert main(["attack", jem, "--norm", "linf", "--eps", "0", *common]) == 0
    m = json.loads((trained_runs / "jem/robustness/metrics.json").read_text())
    assert set(m["defenses"]) == {"none"} and set(m["defenses"]["none"]) == {"linf", "l2"}
    assert set(m["linf"]) == {"0"} and set(m["l2"]) == {"0", "1"}
    # a defence-only rerun (on other images) leaves no undefended linf curve of the earlier invocation behind
    assert main(["attack", jem, "--norm", "linf", "--eps", "0", "--refine-steps", "1", "--refine-chains", "1",
                 "--n", "4", "--steps", "2", "--no-progress"]) == 0
    m = json.loads((trained_runs / "jem/robustness/metrics.json").read_text())
    assert "linf" not in m and set(m["defenses"]) == {"none", "sgld-1x1-full"}
    assert set(m["defenses"]["none"]) == {"l2"} and m["pgd"]["linf"]["n"] == 4


def test_threat_model_flag_and_deprecated_norm_spelling(trained_runs, capsys):
    jem = str(trained_runs / "jem")
    common = ["--n", "4", "--steps", "1", "--no-progress"]
    assert main(["attack", jem, "--threat-model", "l2", "--eps", "0,0.5", *common]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert main(["attack", jem, "--norm", "l2", "--eps", "0,0.25", *common]) == 0
    assert "--norm is deprecated, use --threat-model" in capsys.readouterr().err
    m = json.loads((trained_runs / "jem/robustness/metrics.json").read_text())
    assert set(m["l2"]) == {"0", "0.25"}
    with pytest.raises(SystemExit) as e:  # argparse: one line, exit 2
        main(["attack", jem, "--threat-model", "l1", *common])
    assert e.value.code == 2 and "invalid choice: 'l1'" in capsys.readouterr().err
