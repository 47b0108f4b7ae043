import math

import torch
import torch.nn.functional as F

from olmoearth.losses import info_nce, patch_discrimination


def naive_patch_disc(pred, target, valid, group, tau):
    """Loop reference: per modality, per sample CE over that sample's decoded tokens of the modality."""
    total = 0.0
    for g in sorted(set(group[valid].tolist())):
        per_sample = []
        for b in range(pred.shape[0]):
            sel = [i for i in range(pred.shape[1]) if valid[b, i] and group[b, i] == g]
            if not sel:
                continue
            p = F.normalize(pred[b, sel], dim=-1)
            t = F.normalize(target[b, sel], dim=-1)
            logits = p @ t.T / tau
            ce = F.cross_entropy(logits, torch.arange(len(sel)), reduction="none") * 2 * tau
            per_sample.append(ce.mean())
        total += torch.stack(per_sample).mean()
    return total


def _case(seed=0, B=3, Q=10, D=16):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, Q, D, generator=g)
    target = torch.randn(B, Q, D, generator=g)
    valid = torch.rand(B, Q, generator=g) < 0.7
    group = torch.randint(0, 3, (B, Q), generator=g)
    return pred, target, valid, group


def test_patch_disc_matches_a_loop_reference():
    for seed in range(4):
        pred, target, valid, group = _case(seed)
        got = patch_discrimination(pred, target, valid, group, 0.1)
        want = naive_patch_disc(pred, target, valid, group, 0.1)
        assert torch.allclose(got, want, atol=1e-5), (got, want)


def test_patch_disc_negatives_are_only_same_sample_same_modality():
    pred, target, valid, group = _case(1)
    base = patch_discrimination(pred, target, valid, group, 0.1)
    # changing ignored (not decoded) tokens changes nothing
    t2 = target.clone()
    t2[~valid] = torch.randn_like(t2[~valid])
    assert torch.allclose(patch_discrimination(pred, t2, valid, group, 0.1), base)
    # swapping the group of one token changes the loss (negatives are per modality)
    g2 = group.clone()
    i = int(torch.nonzero(valid[0])[0])
    g2[0, i] = (g2[0, i] + 1) % 3
    assert not torch.allclose(patch_discrimination(pred, target, valid, g2, 0.1), base)


def test_patch_disc_rewards_correct_predictions():
    pred, target, valid, group = _case(2)
    good = patch_discrimination(target.clone(), target, valid, group, 0.1)
    bad = patch_discrimination(pred, target, valid, group, 0.1)
    assert good < bad
    nothing = patch_discrimination(pred, target, torch.zeros_like(valid), group, 0.1)
    assert float(nothing) == 0.0


def test_info_nce():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 32, generator=g)
    loss_same = info_nce(a, a + 0.01 * torch.randn(8, 32, generator=g), 0.1)
    loss_rand = info_nce(a, torch.randn(8, 32, generator=g), 0.1)
    assert loss_same < 0.01 < loss_rand
    b = torch.randn(8, 32, generator=g)
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / 0.1
    want = -torch.log_softmax(logits, dim=1).diagonal().mean()
    assert torch.allclose(info_nce(a, b, 0.1), want, atol=1e-5)
    assert abs(float(info_nce(torch.zeros(4, 3) + 1, torch.zeros(4, 3) + 1, 0.1)) - math.log(4)) < 1e-5
