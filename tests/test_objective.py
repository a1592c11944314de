"""The JEM loss as a pure function: every term checked against its definition, no sampler involved."""
import pytest
import torch
import torch.nn.functional as F

from jemtorch import JEM, Weights, create_model, jem_loss
from jemtorch.energy import eval_mode
from jemtorch.objective import classifier_terms, entropy, forward_chunks, grad_penalty, pseudo_label_loss, split_gradients, vat_loss


@pytest.fixture
def batch():
    torch.manual_seed(0)
    jem = JEM(create_model("cnn-4", in_channels=1, num_classes=10))
    x, x_px, x_q, x_qy = (torch.rand(6, 1, 8, 8) * 2 - 1 for _ in range(4))
    return jem, x, torch.arange(6) % 10, x_px, x_q, x_qy


def test_every_term_matches_its_definition(batch):
    jem, x, y, x_px, x_q, x_qy = batch
    w = Weights(clf=0.7, px=1.3, pxy=0.4, energy_reg=0.2)
    loss, stats = jem_loss(jem, x, y, weights=w, x_px=x_px, samples=x_q, samples_y=x_qy)
    with torch.no_grad():
        ce = F.cross_entropy(jem(x), y)
        gap = jem.energy(x_px).mean() - jem.energy(x_q).mean()
        reg = jem.energy(x_px).pow(2).mean() + jem.energy(x_q).pow(2).mean()
        pxy = -jem(x).gather(1, y[:, None]).mean() + jem(x_qy).gather(1, y[:, None]).mean()
    assert stats["l_clf"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert stats["energy_gap"].item() == pytest.approx(gap.item(), rel=1e-5, abs=1e-6)
    assert stats["l_pxy"].item() == pytest.approx(pxy.item(), rel=1e-5, abs=1e-6)
    assert loss.item() == pytest.approx((0.7 * ce + 1.3 * gap + 0.2 * reg + 0.4 * pxy).item(), rel=1e-5)


def test_px_batch_defaults_to_the_labelled_batch(batch):
    jem, x, y, _, x_q, _ = batch
    _, stats = jem_loss(jem, x, y, weights=Weights(), samples=x_q)
    with torch.no_grad():
        assert stats["e_data"].item() == pytest.approx(jem.energy(x).mean().item(), rel=1e-5)


def test_classifier_only_needs_no_samples(batch):
    jem, x, y, *_ = batch
    loss, stats = jem_loss(jem, x, y, weights=Weights(px=0.0))
    assert "energy_gap" not in stats and loss.item() == pytest.approx(F.cross_entropy(jem(x), y).item(), rel=1e-5)
    with pytest.raises(ValueError, match="needs samples"):
        jem_loss(jem, x, y, weights=Weights())


def test_pseudo_label_term_is_the_cross_entropy_on_confident_predictions(batch):
    jem, x, y, x_px, *_ = batch
    with torch.no_grad():
        u = jem(x_px) * 20  # confident logits: some images above a middling threshold, some below
    conf, target = F.softmax(u, 1).max(1)
    tau = conf.median().item()
    kept = conf >= tau
    l_pl, share = pseudo_label_loss(u, tau)
    assert 0 < kept.sum() < len(u) and share.item() == pytest.approx(kept.float().mean().item())
    ce = F.cross_entropy(u, target, reduction="none")
    assert l_pl.item() == pytest.approx((ce * kept).sum().item() / len(u), rel=1e-5)  # mean over all, not over kept
    loss, stats = jem_loss(jem, x, y, weights=Weights(px=0.0, pl=0.5, pl_threshold=1e-6), x_px=x_px)
    with torch.no_grad():
        ce_x, lu = F.cross_entropy(jem(x), y), jem(x_px)
        pl = F.cross_entropy(lu, lu.argmax(1))
    assert stats["pl_mask"].item() == 1.0 and "energy_gap" not in stats
    assert loss.item() == pytest.approx((ce_x + 0.5 * pl).item(), rel=1e-5)
    loss.backward()  # the targets carry no gradient; the logits do
    with pytest.raises(ValueError, match="unlabelled images"):
        jem_loss(jem, x, y, weights=Weights(px=0.0, pl=1.0))


def test_vat_perturbation_is_the_most_sensitive_direction_and_the_term_sums_as_defined(batch):
    """VAT's power iteration finds a direction that changes p(y|x) more than random ones of the same norm; the term is
    that KL with the clean prediction as a fixed target, and jem_loss adds it and the entropy with their weights."""
    jem, x, y, x_px, *_ = batch
    eps = 0.5
    jem.eval()  # each image's logits its own (no batch statistics), whichever pass computes them
    with torch.no_grad():  # a network whose prediction depends on its input (at initialisation it barely does)
        [m for m in jem.modules() if isinstance(m, torch.nn.Linear)][-1].weight.mul_(300)

    def kl_at(r):
        with torch.no_grad():
            p, q = F.log_softmax(jem(x_px), 1), F.log_softmax(jem(x_px + r), 1)
            return (p.exp() * (p - q)).sum(1).mean().item()

    def unit(d):
        return d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)

    torch.manual_seed(1)
    l_vat = vat_loss(jem, x_px, eps)
    randoms = [kl_at(eps * unit(torch.randn_like(x_px))) for _ in range(20)]
    assert l_vat.item() > 2 * max(randoms) > 0  # adversarial, not random
    torch.manual_seed(1)  # the definition: one power iteration from the same random direction of norm 1e-6
    d = (1e-6 * unit(torch.randn_like(x_px))).requires_grad_(True)
    p = F.log_softmax(jem(x_px), 1).detach()
    (g,) = torch.autograd.grad((p.exp() * (p - F.log_softmax(jem(x_px + d), 1))).sum(1).mean(), d)
    assert l_vat.item() == pytest.approx(kl_at(eps * unit(g)), rel=1e-4)
    w = Weights(px=0.0, vat=0.7, vat_eps=eps, vat_ent=0.3)
    torch.manual_seed(1)
    loss, stats = jem_loss(jem, x, y, weights=w, x_px=x_px)
    with torch.no_grad():
        ce, ent = F.cross_entropy(jem(x), y), entropy(jem(x_px))
    assert stats["l_vat"].item() == pytest.approx(l_vat.item(), rel=1e-4)
    assert stats["l_ent"].item() == pytest.approx(ent.item(), rel=1e-5)
    assert loss.item() == pytest.approx((ce + 0.7 * l_vat + 0.3 * ent).item(), rel=1e-4)
    assert classifier_terms(w, stats).item() == pytest.approx(loss.item(), rel=1e-6)  # all of it a classifier's
    loss.backward()
    assert all(p.grad is not None for p in jem.parameters())
    with pytest.raises(ValueError, match="unlabelled images"):
        jem_loss(jem, x, y, weights=Weights(px=0.0, vat=1.0))


def test_vat_leaves_batchnorm_running_statistics_alone():
    torch.manual_seed(0)
    jem = JEM(create_model("wrn-10-1", in_channels=1, num_classes=3, norm="batch"))
    jem.train()
    bns = [m for m in jem.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x = torch.randn(8, 1, 8, 8)
    before = [b.running_mean.clone() for b in bns]
    vat_loss(jem, x, eps=1.0)
    assert all(torch.equal(b.running_mean, r) for b, r in zip(bns, before))


def test_separate_forward_keeps_batchnorm_statistics_apart():
    torch.manual_seed(0)
    jem = JEM(create_model("wrn-10-1", in_channels=1, num_classes=3, norm="batch"))
    jem.train()
    bns = [m for m in jem.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    data, samples = torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8) * 5 + 3
    start = [b.running_mean.clone() for b in bns]

    def reset():
        for b, r in zip(bns, start):
            b.running_mean.copy_(r)

    sep = forward_chunks(jem, {"x": data, "samples": samples}, separate=True)
    after_sep = [b.running_mean.clone() for b in bns]
    reset()
    alone = jem(data)
    after_alone = [b.running_mean.clone() for b in bns]
    reset()
    joint = forward_chunks(jem, {"x": data, "samples": samples}, separate=False)
    # separately, the data's logits and the running statistics are those of the data alone; jointly they are not
    torch.testing.assert_close(sep["x"], alone)
    assert all(torch.equal(a, b) for a, b in zip(after_sep, after_alone))
    assert not torch.allclose(joint["x"], alone, atol=1e-3)
    assert not all(torch.allclose(b.running_mean, a) for b, a in zip(bns, after_alone))


def test_px_norm_running_scores_the_p_x_chunks_as_evaluation_does():
    """--px-norm running: the p(x) data and the samples go through the network with the running averages (eval mode),
    the labelled batch with its own statistics; only the labelled batch moves the averages."""
    torch.manual_seed(0)
    jem = JEM(create_model("cnn-4", in_channels=1, num_classes=3, norm="batch"))
    jem.train()
    data, samples = torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8) * 5 + 3
    before = {k: v.clone() for k, v in jem.state_dict().items()}
    out = forward_chunks(jem, {"x": data, "samples": samples}, separate=True, running=True)
    after = {k: v.clone() for k, v in jem.state_dict().items()}
    jem.load_state_dict(before)
    jem(data)  # the labelled batch alone, in training mode: the averages move exactly as they did above
    for k, v in jem.state_dict().items():
        torch.testing.assert_close(v, after[k], rtol=0, atol=0)
    with torch.no_grad():
        jem.eval()
        as_evaluated = jem(samples)
    torch.testing.assert_close(out["samples"], as_evaluated)
    jem.load_state_dict(after)
    _, stats = jem_loss(jem.train(), data, torch.arange(8) % 3, weights=Weights(), samples=samples, separate=True,
                        running=True)  # the p(x) data default to the labelled batch, seen as evaluation sees it
    with torch.no_grad():
        jem.eval()
        e_data = -jem.log_px(data)
    torch.testing.assert_close(stats["e_data"], e_data.mean(), rtol=1e-4, atol=1e-4)


def test_gradient_penalty_under_px_norm_running_sees_the_images_as_evaluation_does():
    """--px-norm running: the penalty's images go through the network in eval mode like the other p(x) chunks (not by
    their own batch statistics), and no running average moves."""
    torch.manual_seed(0)
    jem = JEM(create_model("cnn-4", in_channels=1, num_classes=3, norm="batch"))
    jem.train()
    with torch.no_grad():
        for _ in range(30):  # running averages of the data's scale
            jem(torch.randn(16, 1, 8, 8))
    data, samples = torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8)
    before = {k: v.clone() for k, v in jem.state_dict().items()}
    running = grad_penalty(jem, data[:4], running=True)
    for k, v in jem.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert jem.training
    with eval_mode(jem):
        torch.testing.assert_close(running, grad_penalty(jem, data[:4]), rtol=1e-5, atol=0)
    assert grad_penalty(jem, data[:4]).item() > 3 * running.item()  # by the images' own statistics: another value
    _, stats = jem_loss(jem, data, torch.arange(8) % 3, weights=Weights(gp=0.5), samples=samples, x_gp=data[:4],
                        separate=True, running=True)
    with eval_mode(jem):  # the averages as the labelled batch left them, before the penalty's pass
        torch.testing.assert_close(stats["l_gp"], grad_penalty(jem, data[:4]).detach(), rtol=1e-5, atol=0)


def test_energy_penalty_forms():
    """per-example squares every energy (its gradient grows with each image's |E|, so it pulls every image to the same
    energy); batch-mean squares the batch mean (the same pull on every image: only the level is held)."""
    from jemtorch.objective import energy_penalty

    e_data = torch.tensor([-1.0, -3.0, -8.0], requires_grad=True)
    e_samples = torch.tensor([2.0, 4.0], requires_grad=True)
    per = energy_penalty(e_data, e_samples, "per-example")
    assert per.item() == pytest.approx((1 + 9 + 64) / 3 + (4 + 16) / 2)
    (g_per,) = torch.autograd.grad(per, e_data)
    assert torch.allclose(g_per, 2 * e_data.detach() / 3)
    mean = energy_penalty(e_data, e_samples, "batch-mean")
    assert mean.item() == pytest.approx(4.0 ** 2 + 3.0 ** 2)
    (g_mean,) = torch.autograd.grad(mean, e_data)
    assert torch.allclose(g_mean, torch.full((3,), 2 * -4.0 / 3))
    with pytest.raises(ValueError, match="per-example, batch-mean"):
        energy_penalty(e_data, e_samples, "median")


def test_batch_mean_penalty_reaches_the_loss(batch):
    jem, x, y, x_px, x_q, _ = batch
    l0, _ = jem_loss(jem, x, y, weights=Weights(), x_px=x_px, samples=x_q)
    l1, _ = jem_loss(jem, x, y, weights=Weights(energy_reg=0.3, energy_reg_form="batch-mean"), x_px=x_px, samples=x_q)
    with torch.no_grad():
        expected = 0.3 * (jem.energy(x_px).mean() ** 2 + jem.energy(x_q).mean() ** 2)
    assert (l1 - l0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_contrastive_divergence_term_is_the_gap_to_chains_from_the_data(batch):
    """w_cd·(E(x_px) − E(x̃)): x̃ are the p(x) images after the chains; the term needs both."""
    jem, x, y, x_px, x_q, x_qy = batch
    l0, _ = jem_loss(jem, x, y, weights=Weights(), x_px=x_px, samples=x_q)
    l1, stats = jem_loss(jem, x, y, weights=Weights(cd=0.5), x_px=x_px, samples=x_q, x_cd=x_qy[:3])
    with torch.no_grad():
        cd = jem.energy(x_px).mean() - jem.energy(x_qy[:3]).mean()
    assert stats["l_cd"].item() == pytest.approx(cd.item(), rel=1e-5, abs=1e-6)
    assert (l1 - l0).item() == pytest.approx(0.5 * cd.item(), rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="contrastive-divergence term needs"):
        jem_loss(jem, x, y, weights=Weights(cd=0.5), x_px=x_px, samples=x_q)


def test_gradient_penalty_is_the_squared_input_gradient_of_the_energy(batch):
    """γ·mean‖∇ₓE(x_gp)‖², checked against central differences of E, and trainable: a step on it lowers it."""
    jem, x, y, x_px, x_q, _ = batch
    jem = jem.double()
    x, x_px, x_q = x.double(), x_px.double(), x_q.double()
    l0, _ = jem_loss(jem, x, y, weights=Weights(), x_px=x_px, samples=x_q)
    l1, stats = jem_loss(jem, x, y, weights=Weights(gp=0.5), x_px=x_px, samples=x_q, x_gp=x_px[:2])
    h, squared = 1e-6, []
    with torch.no_grad():
        for img in x_px[:2]:
            grad = torch.zeros(img.numel(), dtype=torch.float64)
            for i in range(img.numel()):
                d = torch.zeros(img.numel(), dtype=torch.float64)
                d[i] = h
                grad[i] = (jem.energy((img + d.view_as(img))[None]) - jem.energy((img - d.view_as(img))[None])).item() / (2 * h)
            squared.append(grad.pow(2).sum())
    assert stats["l_gp"].item() == pytest.approx(torch.stack(squared).mean().item(), rel=1e-5)
    assert (l1 - l0).item() == pytest.approx(0.5 * stats["l_gp"].item(), rel=1e-6)
    before = grad_penalty(jem, x_px)
    before.backward()  # double backpropagation: the penalty's gradient reaches the weights
    with torch.no_grad():  # a step whose first-order prediction lowers the penalty by 10%
        size = 0.1 * before / sum(p.grad.pow(2).sum() for p in jem.parameters())
        for p in jem.parameters():
            p -= size * p.grad
    assert grad_penalty(jem, x_px).item() < 0.95 * before.item()
    with pytest.raises(ValueError, match="gradient penalty needs"):
        jem_loss(jem, x, y, weights=Weights(gp=0.5), x_px=x_px, samples=x_q)


def test_split_gradients_projects_the_rest_off_the_classification_gradient_only_where_they_conflict():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    for rest, projected, conflict in (([-2.0, 3.0], [0.0, 3.0], 1), ([2.0, 3.0], [2.0, 3.0], 0)):  # c = (1, 0)
        w.grad = None
        clf = (w * torch.tensor([1.0, 0.0])).sum()
        c, g, stats = split_gradients([w], clf, clf + (w * torch.tensor(rest)).sum(), project=True)
        assert torch.allclose(c[0], torch.tensor([1.0, 0.0])) and torch.allclose(g[0], torch.tensor(projected))
        assert stats["grad_conflict"] == conflict
        assert stats["grad_cos"] == pytest.approx(rest[0] / 13 ** 0.5) and stats["grad_ratio"] == pytest.approx(13 ** 0.5)
    w.grad = None
    clf = (w * torch.tensor([1.0, 0.0])).sum()
    _, g, _ = split_gradients([w], clf, clf + (w * torch.tensor([-2.0, 3.0])).sum())  # not asked: g as it is
    assert torch.allclose(g[0], torch.tensor([-2.0, 3.0]))
