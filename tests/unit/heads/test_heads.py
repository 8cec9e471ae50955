import math

import numpy as np
import pytest
import torch

from hipt_ray.heads import (
    HIPTLGP,
    case_folds,
    classification_metrics,
    concordance,
    cox_loss,
    create_head,
    km_split,
    survival_bins,
    survival_nll,
)
from hipt_ray.heads.losses import risk_from_logits


def test_hipt_lgp_has_the_published_parameter_names():
    keys = set(HIPTLGP(n_classes=3, local_vit="vit4k_xs").state_dict())
    expected = {
        "global_phi.0.weight",
        "global_phi.0.bias",
        "classifier.weight",
        "classifier.bias",
        "global_rho.0.weight",
        "global_rho.0.bias",
    }
    for i in (0, 1):
        p = f"global_transformer.layers.{i}."
        expected |= {
            p + k
            for k in (
                "self_attn.in_proj_weight",
                "self_attn.in_proj_bias",
                "self_attn.out_proj.weight",
                "self_attn.out_proj.bias",
                "linear1.weight",
                "linear1.bias",
                "linear2.weight",
                "linear2.bias",
                "norm1.weight",
                "norm1.bias",
                "norm2.weight",
                "norm2.bias",
            )
        }
    for branch in ("attention_a.0", "attention_b.0", "attention_c"):
        expected |= {f"global_attn_pool.{branch}.weight", f"global_attn_pool.{branch}.bias"}
    vit4k = {
        "local_vit." + k for k in __import__("hipt_ray.models", fromlist=["x"]).create_model("vit4k_xs").state_dict()
    }
    assert keys == expected | vit4k
    assert set(HIPTLGP(n_classes=3).state_dict()) == expected
    layer = HIPTLGP(n_classes=2).global_transformer.layers[0]
    assert not layer.norm_first and layer.linear1.out_features == 192 and layer.self_attn.num_heads == 3


def test_local_vit_reads_tokens_in_the_published_grid_order():
    torch.manual_seed(0)
    head = HIPTLGP(n_classes=2, local_vit="vit4k_tiny", dim=32, n_heads=2).eval()
    tokens = torch.randn(3, 256, 48)
    with torch.no_grad():
        logits, attn = head(tokens)
        grid = tokens.unfold(1, 16, 16).transpose(1, 2)  # the published code's [M, 384, 16, 16]
        emb = head.local_vit(grid)
        head.local_vit = None
        logits2, _ = head(emb)
    assert torch.allclose(logits, logits2, atol=1e-6) and attn.shape == (3,)


@pytest.mark.parametrize("name", ["hipt_lgp", "abmil", "mean_mlp"])
def test_heads_are_invariant_to_region_order(name):
    torch.manual_seed(1)
    head = create_head(name, n_classes=4).eval()
    bag = torch.randn(7, 192)
    perm = torch.randperm(7)
    with torch.no_grad():
        a, attn_a = head(bag)
        b, attn_b = head(bag[perm])
    assert a.shape == (1, 4) and torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(attn_a[perm], attn_b, atol=1e-6) and attn_a.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="known heads"):
        create_head("transmil", n_classes=2)


@pytest.mark.parametrize("name", ["hipt_lgp", "abmil", "mean_mlp"])
def test_a_padded_batch_of_bags_gives_each_bag_its_own_outputs_and_gradients(name):
    from hipt_ray.heads.features import FeatureTransform
    from hipt_ray.heads.models import forward_bags, pad_bags

    torch.manual_seed(2)
    head = create_head(name, n_classes=3, dropout=0.0)
    head.prep = FeatureTransform(torch.full((192,), 0.5), torch.full((192,), 2.0))  # padding is not zero after it
    bags = [torch.randn(m, 192) for m in (5, 1, 9, 3)]
    x, mask = pad_bags(bags)
    assert x.shape == (4, 9, 192) and mask.sum(1).tolist() == [5, 1, 9, 3]
    for mode in (head.eval, head.train):  # eval: PyTorch's fused transformer path; train: autograd's
        mode()
        logits, attn = head.forward_padded(x, mask)
        one = [head(b) for b in bags]
        assert torch.allclose(logits, torch.cat([o[0] for o in one]), atol=1e-5)
        for k, (b, o) in enumerate(zip(bags, one)):
            assert torch.allclose(attn[k, : len(b)], o[1], atol=1e-6) and (attn[k, len(b) :] == 0).all()
    # a step on the batch moves the weights as the bag-by-bag step does
    grads = []
    for run in (lambda: forward_bags(head, bags), lambda: torch.cat([head(b)[0] for b in bags])):
        head.zero_grad()
        torch.nn.functional.cross_entropy(run(), torch.tensor([0, 1, 2, 0])).backward()
        grads.append(torch.cat([p.grad.flatten() for p in head.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_survival_nll_by_hand():
    logits = torch.tensor([[0.0, 1.0, -1.0, 0.5], [0.2, -0.3, 0.1, 0.0]])
    h = torch.sigmoid(logits)
    # case 0: event in bin 1 → −log(1−h00) − log h01 ; case 1: censored in bin 2 → −Σ_{k≤2} log(1−h1k)
    l0 = -math.log(1 - h[0, 0]) - math.log(h[0, 1])
    l1 = -sum(math.log(1 - h[1, k]) for k in range(3))
    loss = survival_nll(logits, torch.tensor([1, 2]), torch.tensor([1, 0]))
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    weighted = survival_nll(logits, torch.tensor([1, 2]), torch.tensor([1, 0]), alpha=0.5)
    assert weighted.item() == pytest.approx((0.5 * (l0 + l1) + 0.5 * l0) / 2, rel=1e-6)


def test_cox_loss_by_hand():
    risk = torch.tensor([0.5, -0.2, 1.0])
    times = torch.tensor([5.0, 10.0, 2.0])
    events = torch.tensor([1, 0, 1])
    r = risk.tolist()
    # event at t=2 (risk set: all three), event at t=5 (risk set: t ≥ 5 → cases 0, 1)
    ll = (r[2] - math.log(sum(math.exp(x) for x in r))) + (r[0] - math.log(math.exp(r[0]) + math.exp(r[1])))
    assert cox_loss(risk, times, events).item() == pytest.approx(-ll / 2, rel=1e-6)


def test_cindex_sign_higher_risk_earlier_event():
    times = np.array([2.0, 5.0, 9.0, 12.0])
    events = np.array([1, 1, 1, 0])
    assert concordance(times, events, risk=np.array([4.0, 3.0, 2.0, 1.0])) == 1.0
    assert concordance(times, events, risk=np.array([1.0, 2.0, 3.0, 4.0])) == 0.0
    # risk from logits: higher hazards → higher risk
    assert risk_from_logits(torch.tensor([[2.0, 2.0], [-2.0, -2.0]])).argmax().item() == 0


def test_survival_bins_use_uncensored_quartiles():
    times = np.array([1, 2, 3, 4, 5, 100, 200], dtype=float)
    events = np.array([1, 1, 1, 1, 1, 0, 0])
    assert survival_bins(times, events).tolist() == [2.0, 3.0, 4.0]


def test_classification_metrics_and_km():
    m = classification_metrics(np.array([0, 0, 1, 1]), np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]))
    assert m == {"auc": 1.0, "balanced_accuracy": 1.0}
    three = classification_metrics(np.array([0, 1, 2]), np.eye(3))
    assert three["auc"] == 1.0
    rng = np.random.default_rng(0)
    risk = np.r_[np.ones(30), np.zeros(30)]
    times = np.r_[rng.exponential(5, 30), rng.exponential(50, 30)]
    km = km_split(times, np.ones(60), risk, threshold=0.5)
    assert (
        km["n_high"] == 30
        and km["p_value"] < 1e-3
        and km["km_high"].median_survival_time_ < km["km_low"].median_survival_time_
    )


def test_metrics_equal_scikit_learns_with_ties_and_several_classes():
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    rng = np.random.default_rng(0)
    for n_classes in (2, 3, 4):
        for _ in range(20):
            y = rng.integers(0, n_classes, 30)
            counts = rng.integers(1, 4, (30, n_classes))  # coarse scores: many ties, which count half in both
            probs = counts / counts.sum(1, keepdims=True)
            if len(set(y)) < n_classes:
                with pytest.raises(ValueError):
                    classification_metrics(y, probs)
                continue
            ours = classification_metrics(y, probs)
            ref = (
                roc_auc_score(y, probs[:, 1])
                if n_classes == 2
                else roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(n_classes)))
            )
            assert ours["auc"] == pytest.approx(ref, abs=1e-12)
            assert ours["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, probs.argmax(1)), abs=1e-12)
    with pytest.raises(ValueError, match="one class"):
        classification_metrics(np.zeros(4, int), np.full((4, 2), 0.5))
    with pytest.raises(ValueError, match="not finite"):
        classification_metrics(np.array([0, 1]), np.array([[0.5, np.nan], [0.2, 0.8]]))


def test_case_folds_are_stratified_without_leakage_and_hashed():
    cases = [f"c{i:02d}" for i in range(40)]
    labels = [i % 2 for i in range(40)]
    folds, digest = case_folds(cases, labels, k=5, seed=3)
    assert len(folds) == 5 and len(digest) == 16
    seen_val = [c for f in folds for c in f["val"]]
    assert sorted(seen_val) == cases  # every case validated exactly once
    for f in folds:
        assert not set(f["train"]) & set(f["val"])
        assert sum(labels[int(c[1:])] for c in f["val"]) == 4  # 8 per fold, half of each label
    assert case_folds(cases, labels, k=5, seed=3)[1] == digest and case_folds(cases, labels, k=5, seed=4)[1] != digest
    quarter, _ = case_folds(cases, labels, k=5, seed=3, train_fraction=0.25)
    assert len(quarter[0]["train"]) == 8
    with pytest.raises(ValueError, match="unique"):
        case_folds(["a", "a"], [0, 1], k=2)
