"""The JEM objective, as a pure function of the model and four batches.

    L = w_clf·CE(f(x), y)                                    classification, −log p(y|x)
      + w_px·(E(x_px) − E(x̂))                                generative, −log p(x) up to log Z (the energy gap)
      + w_pxy·(f(x̂_y)[y] − f(x)[y])                          −log p(x, y) with class-conditional samples
      + λ·(E(x_px)² + E(x̂)²)                                 optional energy-magnitude penalty (--energy-reg):
                                                               per example (mean of E²) or on the batch means
      + w_cd·(E(x_px) − E(x̃))                                optional contrastive divergence (--cd-weight): x̃ =
                                                               p(x) images after K chain steps (Hinton 2002)
      + γ·‖∇ₓE(x_gp)‖²                                       optional zero-centred gradient penalty on p(x) images
                                                               (--grad-penalty; R1, Mescheder et al. 2018)
      + w_pl·mean(1[max softmax f(x_u) ≥ τ]·CE(f(x_u), ŷ))     optional Pseudo-Label on the unlabelled images x_u
                                                               (--pseudo-label-weight; ŷ = argmax f(x_u), no gradient;
                                                               Lee 2013): a semi-supervised *classifier* term, the
                                                               baseline a semi-supervised JEM must beat
      + w_vat·KL(p(y|x_u) ‖ p(y|x_u + r_adv)) + w_ent·H(p(y|x_u)) optional virtual adversarial training on the
                                                               unlabelled images (--vat-weight; r_adv the most
                                                               sensitive direction, ‖r_adv‖ = ε; Miyato et al.
                                                               2018): the other semi-supervised classifier term

With --grad-surgery the gradient of everything after the first line is projected off the classification term's
gradient where the two conflict before they are summed (``split_gradients``; PCGrad, Yu et al. 2020).
With --px-tail-grad logit-shift, in the classifier's tail, that gradient is kept only on the shift the last layer adds
to every logit (``logit_shift``), which the softmax ignores, and --px-tail-leak of the rest.

Why the penalty's form matters: against the p(x) term's constant pull (−1 per example on E(data)), a per-example
penalty λ·E(x)² balances at E(x) = −w_px/(2λ) for *every* training image, so every image's LogSumExp f(x) is driven
to the same value — a logit-norm constraint that leaves the classifier under-confident. The batch-mean form
λ·(mean E)² holds the same level but lets easy images sit lower in energy than hard ones (measured:
docs/results/fashion-mnist.md). Either form has a fixed point where the energies stop moving once the data and the
samples are told apart: E(data) = −w/(2λ), E(samples) = +w/(2λ) (health.py calls this *pinned*).

Nothing here draws samples or touches a replay buffer: the training step draws x̂ and x̂_y and hands them in.
Every tensor is passed through the network in named chunks, either in one concatenated forward pass (cheapest,
right for networks without batch statistics) or chunk by chunk (``separate=True``: what networks with BatchNorm
need, so data and samples do not share batch statistics — as the reference JEM++/SADA-JEM code does). In the
separate mode only the labelled batch updates BatchNorm's running averages, so the statistics used at test time
are data statistics.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .energy import JEM, eval_mode, image_norms
from .sampler import running_stats_frozen
from .settings import Need, setting

ENERGY_REG_FORMS = ("per-example", "batch-mean")


@dataclass
class ObjectiveSettings:
    """The settings of the loss: the terms' weights and the energy penalty."""

    p_y_given_x_weight: float = setting(1.0, "weight of the classification term −log p(y|x)")
    p_x_weight: float = setting(1.0, "weight of the generative term −log p(x); 0 trains a plain classifier")
    p_x_y_weight: float = setting(0.0, "weight of −log p(x, y) with class-conditional samples (paper's p(x|y) "
                                       "factored)")
    energy_reg: float = setting(0.0, "weight λ of λ·(E(data)² + E(samples)²), an energy-magnitude regulariser "
                                     "(Du & Mordatch 2019; not in the JEM paper)")
    energy_reg_form: str = setting("per-example", "what --energy-reg squares: per-example (the mean of E², Du & "
                                                  "Mordatch 2019, M-EBM: holds every image's energy at the same "
                                                  "value) or batch-mean (the square of the batch's mean E: holds only "
                                                  "the level, so confident images keep a larger LogSumExp)")
    cd_weight: float = setting(0.0, "weight of a contrastive-divergence term E(data) − E(x̃), x̃ = p(x) training images "
                                    "moved by the run's chain update (Hinton 2002, CD-K): pushes the density down "
                                    "along the chains' path out of the data, so data sit at its local maxima and long "
                                    "chains stop near them; read only with the p(x) term (a baseline ignores it); 0: off "
                                    "(the JEM paper)")
    cd_batch_size: int = setting(0, "images per step whose chains the --cd-weight term runs (the first of the p(x) "
                                    "batch); 0: the whole p(x) batch")
    cd_steps: int = setting(0, "chain steps of the --cd-weight term's chains from the data; 0: the run's --sgld-steps")
    grad_penalty: float = setting(0.0, "weight γ of γ·‖∇ₓE(x)‖² on p(x) training images: a zero-centred gradient "
                                        "penalty (R1: Mescheder et al. 2018, 'Which training methods for GANs do "
                                        "actually converge?'; on an EBM's data: Kumar et al. 2019, 'Maximum entropy "
                                        "generators for energy-based models') that keeps the energy flat at the data; "
                                        "costs a double backward pass over --grad-penalty-batch images; seen as the "
                                        "p(x) data are (--px-norm); read only with the p(x) term; 0: off (the JEM "
                                        "paper)")
    grad_penalty_batch: int = setting(32, "images per step the --grad-penalty term sees (the first of the p(x) batch); "
                                          "0: the whole p(x) batch")
    grad_surgery: bool = setting(False, "project the generative terms' gradient off the classification term's where "
                                        "they conflict (negative dot product over all weights), so that to first order "
                                        "no step raises the cross-entropy: PCGrad (Yu et al. 2020, 'Gradient surgery "
                                        "for multi-task learning'), one projection over the whole network; costs a "
                                        "second backward pass; not with --sam-rho or torchrun; off: the plain sum (the "
                                        "JEM paper)")
    separate_forward: bool = setting(False, "pass data, p(x) data and samples through the network separately "
                                            "(needed with BatchNorm: no shared batch statistics); off: one "
                                            "concatenated forward pass")
    px_norm: str = setting("batch", "with --separate-forward, how normalisation layers see the p(x) data and the "
                                    "samples in the loss: batch (each batch's own statistics, as JEM++/SADA-JEM) or "
                                    "running (the labelled data's running averages, as evaluation sees every image: "
                                    "the density trained is the one scored; use with --sample-mode eval)")

    pseudo_label_weight: float = setting(0.0, "semi-supervised (--labels-per-class): weight λ_u of Pseudo-Label's "
                                              "term on the unlabelled images, cross-entropy against the network's own "
                                              "hard prediction where its top softmax probability is at least "
                                              "--pseudo-label-threshold (Lee 2013, 'Pseudo-Label'; as USB's "
                                              "pseudolabel, microsoft/Semi-supervised-learning, semilearn/algorithms/"
                                              "pseudolabel/pseudolabel.py: λ_u 1); a classifier term, so a baseline "
                                              "keeps it; 0: off")
    pseudo_label_threshold: float = setting(0.95, "the confidence a prediction needs to become a pseudo-label (USB's "
                                                  "p_cutoff 0.95, the value of FixMatch, Sohn et al. 2020)")
    pseudo_label_warmup: float = setting(0.4, "share of the run's iterations over which --pseudo-label-weight and "
                                              "--vat-weight rise linearly from 0 (USB's unsup_warm_up 0.4)")
    vat_weight: float = setting(0.0, "semi-supervised (--labels-per-class): weight of virtual adversarial training's "
                                     "term on the unlabelled images, KL(p(y|x) ‖ p(y|x + r)) with r the direction of "
                                     "norm --vat-eps that changes p(y|x) most (one power iteration from a random "
                                     "direction of norm 1e-6), plus --vat-entropy times the entropy of p(y|x) "
                                     "(Miyato et al. 2018, 'Virtual adversarial training', TPAMI; as USB's vat, "
                                     "microsoft/Semi-supervised-learning, semilearn/algorithms/vat/vat.py: weight 1, "
                                     "xi 1e-6, one iteration); a classifier term, so a baseline keeps it; costs one "
                                     "more forward pass and two more forward and backward passes over the unlabelled "
                                     "batch; 0: off")
    vat_eps: float = setting(4.0, "L2 norm ε of the virtual adversarial perturbation, in the network's input units "
                                  "([-1, 1]). USB's vat_eps 6 (CIFAR-10 normalised by the channels' std ~0.25) is "
                                  "1.5 at the same size per value on a 28x28 image in [-1, 1]; 4 beat it on "
                                  "Fashion-MNIST with 100 labels per class by validation accuracy on two seeds of "
                                  "three and tied the third (docs/results/density.md, 'Against virtual adversarial "
                                  "training')")
    vat_entropy: float = setting(0.06, "weight of the entropy of p(y|x) on the unlabelled images that --vat-weight "
                                       "adds (VAT + EntMin; USB's ent_loss_ratio 0.06); not ramped")

    def check(self, need: Need) -> None:
        need(self.pseudo_label_weight >= 0, f"--pseudo-label-weight must be >= 0, got {self.pseudo_label_weight}")
        need(self.pseudo_label_weight == 0 or self.labels_per_class > 0,
             "--pseudo-label-weight needs unlabelled images: set --labels-per-class")
        need(0 < self.pseudo_label_threshold <= 1,
             f"--pseudo-label-threshold must be in (0, 1], got {self.pseudo_label_threshold}")
        need(0 <= self.pseudo_label_warmup <= 1,
             f"--pseudo-label-warmup must be in [0, 1], got {self.pseudo_label_warmup}")
        need(self.vat_weight >= 0, f"--vat-weight must be >= 0, got {self.vat_weight}")
        need(self.vat_weight == 0 or self.labels_per_class > 0,
             "--vat-weight needs unlabelled images: set --labels-per-class")
        need(self.vat_eps > 0, f"--vat-eps must be > 0, got {self.vat_eps}")
        need(self.vat_entropy >= 0, f"--vat-entropy must be >= 0, got {self.vat_entropy}")
        need(min(self.p_y_given_x_weight, self.p_x_weight, self.p_x_y_weight) >= 0, "loss weights must be >= 0")
        need(self.p_y_given_x_weight + self.p_x_weight + self.p_x_y_weight > 0, "at least one loss weight must be > 0")
        need(self.energy_reg >= 0, f"--energy-reg must be >= 0, got {self.energy_reg}")
        need(self.cd_weight >= 0, f"--cd-weight must be >= 0, got {self.cd_weight}")
        need(self.cd_batch_size >= 0, f"--cd-batch-size must be >= 0, got {self.cd_batch_size}")
        need(self.cd_steps >= 0, f"--cd-steps must be >= 0, got {self.cd_steps}")
        need(self.grad_penalty >= 0, f"--grad-penalty must be >= 0, got {self.grad_penalty}")
        need(self.grad_penalty_batch >= 0, f"--grad-penalty-batch must be >= 0, got {self.grad_penalty_batch}")
        need(not (self.grad_surgery and self.sam_rho > 0), "--grad-surgery does not combine with --sam-rho")
        need(self.px_norm in ("batch", "running"), f"--px-norm must be batch or running, got {self.px_norm!r}")
        need(self.energy_reg_form in ENERGY_REG_FORMS,
             f"--energy-reg-form must be one of {', '.join(ENERGY_REG_FORMS)}, got {self.energy_reg_form!r}")


@dataclass(frozen=True)
class Weights:
    """Loss weights (TrainConfig: p_y_given_x_weight, p_x_weight, p_x_y_weight, energy_reg, energy_reg_form,
    cd_weight, grad_penalty, pseudo_label_weight and _threshold, vat_weight, _eps and _entropy)."""

    clf: float = 1.0
    px: float = 1.0
    pxy: float = 0.0
    energy_reg: float = 0.0
    energy_reg_form: str = "per-example"
    cd: float = 0.0
    gp: float = 0.0
    pl: float = 0.0
    pl_threshold: float = 0.95
    vat: float = 0.0
    vat_eps: float = 4.0
    vat_ent: float = 0.06

    @property
    def unlabelled(self) -> bool:
        """Does a semi-supervised classifier term (Pseudo-Label, VAT) read the unlabelled images?"""
        return self.pl > 0 or self.vat > 0

    @classmethod
    def from_config(cls, cfg) -> Weights:
        px = cfg.p_x_weight > 0
        return cls(cfg.p_y_given_x_weight, cfg.p_x_weight, cfg.p_x_y_weight, cfg.energy_reg, cfg.energy_reg_form,
                   cfg.cd_weight if px else 0.0, cfg.grad_penalty if px else 0.0, cfg.pseudo_label_weight,
                   cfg.pseudo_label_threshold, cfg.vat_weight, cfg.vat_eps, cfg.vat_entropy)


def energy_penalty(e_data: torch.Tensor, e_samples: torch.Tensor, form: str) -> torch.Tensor:
    """E(data)² + E(samples)²: per example (mean of squares) or of the batch means (square of means; under torchrun,
    each rank's batch)."""
    if form == "per-example":
        return e_data.pow(2).mean() + e_samples.pow(2).mean()
    if form == "batch-mean":
        return e_data.mean().pow(2) + e_samples.mean().pow(2)
    raise ValueError(f"energy penalty form must be one of {', '.join(ENERGY_REG_FORMS)}, got {form!r}")


@contextlib.contextmanager
def as_px_chunk(jem: JEM, running: bool):
    """How a pass other than the labelled batch's sees the network: running statistics left as they are, and with
    ``running`` (--px-norm running) in eval mode, as evaluation sees every image."""
    with running_stats_frozen(jem), (eval_mode(jem) if running else contextlib.nullcontext()):
        yield


def grad_penalty(jem: JEM, x: torch.Tensor, running: bool = False) -> torch.Tensor:
    """Mean over images of ‖∇ₓE(x)‖², differentiable in the weights (double backpropagation). Its own forward pass,
    leaving normalisation layers' running statistics as they are: in the network's current mode (in training,
    BatchNorm normalises by these images' statistics), or with ``running`` in eval mode, as the p(x) data are seen
    under --px-norm running."""
    x = x.detach().requires_grad_(True)
    with as_px_chunk(jem, running):
        e = -jem.log_px(x)
    (g,) = torch.autograd.grad(e.sum(), x, create_graph=True)
    return g.pow(2).flatten(1).sum(1).mean()


def split_gradients(params: list, clf_loss: torch.Tensor, loss: torch.Tensor, project: bool = False):
    """The gradients of ``clf_loss`` (c) and of the rest of ``loss`` (g = ∇(loss − clf_loss)), per parameter, by two
    backward passes (``p.grad`` is left holding g). ``project`` (--grad-surgery): g projected off c where they
    conflict, g − min(0, g·c)/‖c‖²·c (PCGrad: Yu et al. 2020, 'Gradient surgery for multi-task learning', NeurIPS;
    one projection over all ``params``), so that a step along c + g never raises ``clf_loss`` to first order.
    Returns c, g and their statistics before any projection (0-d tensors): the cosine, whether they conflict, and
    ‖g‖/‖c‖."""
    c = torch.autograd.grad(clf_loss, params, retain_graph=True, allow_unused=True)
    (loss - clf_loss).backward()
    c = [torch.zeros_like(p) if gc is None else gc for p, gc in zip(params, c)]
    g = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    with torch.no_grad():
        dot = sum((a * b).sum() for a, b in zip(g, c))
        cc, gg = sum(a.pow(2).sum() for a in c), sum(a.pow(2).sum() for a in g)
        stats = {"grad_cos": dot / (cc * gg).sqrt().clamp(min=1e-30), "grad_conflict": (dot < 0).float(),
                 "grad_ratio": (gg / cc.clamp(min=1e-30)).sqrt()}
        if project:
            coef = dot.clamp(max=0) / cc.clamp(min=1e-30)
            g = [gp - coef * cp for gp, cp in zip(g, c)]
    return c, g, stats


def logit_shift(gen_loss: torch.Tensor, head: torch.nn.Linear) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The gradient of ``gen_loss`` kept only on the shift ``head`` adds to every logit, as (parameter, gradient) pairs:
    on its weight each row replaced by the rows' mean (W ← W + 1·uᵀ moves every logit by u·h), on its bias each entry
    by the mean. The softmax, and so the classifier, does not see such a step: the cross-entropy's own gradient has no
    component there (its rows sum to zero), so adding it leaves the classifier's training as it would be alone, while
    the energy −LogSumExp f(x) moves by −u·h(x) (--px-tail-grad logit-shift). Autograd goes back to ``head`` only
    (the logits' gradient times the last features): no pass through the rest of the network; the graph is kept."""
    params = [p for p in (head.weight, head.bias) if p is not None]
    grads = torch.autograd.grad(gen_loss, params, retain_graph=True, allow_unused=True)
    return [(p, torch.zeros_like(p) if g is None else g.mean(0, keepdim=True).expand_as(g))
            for p, g in zip(params, grads)]


def pseudo_label_loss(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-Label (Lee 2013) with a confidence cut-off (as USB's pseudolabel): the mean over all images of
    1[max softmax ≥ ``threshold``]·CE(logits, argmax), the targets and the mask taken without gradient; and the
    share of images kept (the mask's mean)."""
    conf, target = F.softmax(logits.detach().float(), 1).max(1)
    mask = (conf >= threshold).float()
    return (F.cross_entropy(logits, target, reduction="none") * mask).mean(), mask.mean()


def vat_loss(jem: JEM, x_u: torch.Tensor, eps: float, xi: float = 1e-6, running: bool = False) -> torch.Tensor:
    """Virtual adversarial training's term (Miyato et al. 2018; as USB's vat): KL(p(y|x) ‖ p(y|x + r_adv)) averaged
    over the images, p(y|x) without gradient, r_adv = ``eps``·g/‖g‖ per image, g the gradient of that KL at a random
    direction of norm ``xi`` (one power iteration towards the direction p(y|x) is most sensitive to). p(y|x) comes
    from a pass of ``x_u`` alone, shaped as the perturbed passes are: at ``xi`` the KL's gradient is the difference
    of two passes' outputs, and two passes of differently shaped batches differ by more than that (measured: 4e-6
    in the logits, ~10% of the term). All three passes leave normalisation layers' running statistics as they are
    (``as_px_chunk``; USB freezes BatchNorm's likewise)."""
    x_u = x_u.detach()
    with torch.no_grad(), as_px_chunk(jem, running):
        target = F.log_softmax(jem(x_u).float(), 1)

    def kl(x: torch.Tensor) -> torch.Tensor:
        with as_px_chunk(jem, running):
            return F.kl_div(F.log_softmax(jem(x).float(), 1), target, log_target=True, reduction="batchmean")

    d = torch.randn_like(x_u)
    d = (xi * d / image_norms(d)).requires_grad_(True)
    (g,) = torch.autograd.grad(kl(x_u + d), d)
    return kl(x_u + eps * g / image_norms(g))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy of softmax(logits) (entropy minimisation, Grandvalet & Bengio 2004; VAT's 'EntMin')."""
    logp = F.log_softmax(logits.float(), 1)
    return -(logp.exp() * logp).sum(1).mean()


def classifier_terms(weights: Weights, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss's classifier terms, w_clf·CE + w_pl·Pseudo-Label + w_vat·VAT + w_ent·entropy, from ``jem_loss``'s
    statistics: what --grad-surgery and --px-tail-grad keep whole while they reshape the rest (the generative
    terms)."""
    loss = weights.clf * stats["l_clf"] + (weights.pl * stats["l_pl"] if "l_pl" in stats else 0.0)
    return loss + (weights.vat * stats["l_vat"] + weights.vat_ent * stats["l_ent"] if "l_vat" in stats else 0.0)


def forward_chunks(jem: JEM, chunks: dict[str, torch.Tensor], separate: bool = False,
                   running: bool = False) -> dict[str, torch.Tensor]:
    """Logits for every named chunk. Joint: one forward pass over the concatenation. Separate: one pass per chunk;
    only the first chunk (the labelled batch) updates BatchNorm running statistics; ``running``: the other chunks go
    through the network in eval mode (normalised by the running averages, as at evaluation)."""
    names = list(chunks)
    if not separate or len(names) == 1:
        logits = jem(torch.cat([chunks[n] for n in names])).split([len(chunks[n]) for n in names])
        return dict(zip(names, logits))
    out = {names[0]: jem(chunks[names[0]])}
    with as_px_chunk(jem, running):
        for n in names[1:]:
            out[n] = jem(chunks[n])
    return out


def jem_loss(
    jem: JEM,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    weights: Weights,
    x_px: Optional[torch.Tensor] = None,
    samples: Optional[torch.Tensor] = None,
    samples_y: Optional[torch.Tensor] = None,
    x_cd: Optional[torch.Tensor] = None,
    x_gp: Optional[torch.Tensor] = None,
    separate: bool = False,
    running: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The JEM loss of one step and its statistics (0-d tensors; no host sync).

    ``x, y``: the labelled batch (augmented). ``x_px``: the p(x) batch when it is not ``x`` itself (semi-supervised
    data, or un-augmented images); semi-supervised, also the unlabelled images of the Pseudo-Label and VAT terms
    (``weights.unlabelled``). ``samples``: x̂ ~ p(x), needed when ``weights.px > 0``. ``samples_y``: x̂_y ~
    p(x|y) for the labels ``y``, needed when ``weights.pxy > 0``. ``x_cd``: p(x) images moved by the chains, needed
    when ``weights.cd > 0``. ``x_gp``: p(x) images for the gradient penalty, needed when ``weights.gp > 0``.
    ``separate``, ``running``: see
    ``forward_chunks``; with ``running`` the p(x) data are always their own chunk, seen as evaluation sees them.
    """
    if weights.px > 0 and samples is None:
        raise ValueError("the p(x) term needs samples")
    if weights.pxy > 0 and samples_y is None:
        raise ValueError("the p(x, y) term needs class-conditional samples")
    if weights.cd > 0 and (x_cd is None or weights.px <= 0):
        raise ValueError("the contrastive-divergence term needs the p(x) term and chains from the data (x_cd)")
    if weights.gp > 0 and (x_gp is None or weights.px <= 0):
        raise ValueError("the gradient penalty needs the p(x) term and its images (x_gp)")
    if weights.unlabelled and x_px is None:
        raise ValueError("the semi-supervised terms (Pseudo-Label, VAT) need the unlabelled images (x_px)")
    chunks = {"x": x}
    if (weights.px > 0 or weights.unlabelled) and (x_px is not None or (running and separate)):
        chunks["x_px"] = x_px if x_px is not None else x
    if weights.px > 0:
        chunks["samples"] = samples
    if weights.pxy > 0:
        chunks["samples_y"] = samples_y
    if weights.cd > 0:
        chunks["x_cd"] = x_cd
    logits = forward_chunks(jem, chunks, separate, running)

    l_clf = F.cross_entropy(logits["x"], y)
    loss = weights.clf * l_clf
    stats = {"l_clf": l_clf, "train_acc": (logits["x"].argmax(1) == y).float().mean()}
    if weights.pl > 0:  # Pseudo-Label: the confident predictions on unlabelled images as their labels
        l_pl, stats["pl_mask"] = pseudo_label_loss(logits["x_px"], weights.pl_threshold)
        loss = loss + weights.pl * l_pl
        stats["l_pl"] = l_pl
    if weights.vat > 0:  # VAT: p(y|x) kept where a small adversarial step would change it most
        stats["l_vat"] = vat_loss(jem, chunks["x_px"], weights.vat_eps, running=running and separate)
        stats["l_ent"] = entropy(logits["x_px"])
        loss = loss + weights.vat * stats["l_vat"] + weights.vat_ent * stats["l_ent"]
    if weights.px > 0:
        e_data = -jem.log_px(logits=logits.get("x_px", logits["x"]))
        e_samples = -jem.log_px(logits=logits["samples"])
        l_px = e_data.mean() - e_samples.mean()  # = −(LSE f(x) − LSE f(x̂)) = energy gap
        loss = loss + weights.px * l_px
        if weights.energy_reg > 0:
            loss = loss + weights.energy_reg * energy_penalty(e_data, e_samples, weights.energy_reg_form)
        reach = (e_samples.detach() <= e_data.detach().median()).float().mean()  # health.py: chains reach the data?
        stats.update(l_px=l_px, energy_gap=l_px, e_data=e_data.mean(), e_samples=e_samples.mean(), reach=reach)
        if weights.cd > 0:
            l_cd = e_data.mean() + jem.log_px(logits=logits["x_cd"]).mean()  # E(data) − E(x̃)
            loss = loss + weights.cd * l_cd
            stats["l_cd"] = l_cd
        if weights.gp > 0:
            l_gp = grad_penalty(jem, x_gp, running=running and separate)
            loss = loss + weights.gp * l_gp
            stats["l_gp"] = l_gp
    if weights.pxy > 0:
        l_pxy = -jem.log_pxy(None, y, logits=logits["x"]).mean() + jem.log_pxy(None, y, logits=logits["samples_y"]).mean()
        loss = loss + weights.pxy * l_pxy
        stats["l_pxy"] = l_pxy
        stats.setdefault("energy_gap", l_pxy)
    stats["loss"] = loss
    return loss, stats
