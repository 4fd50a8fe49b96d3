"""PGD (L-inf) against an independent loop, ball/pixel constraints, loss increase, no leaks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlightning.attacks import PGDConfig, pgd_attack


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def reference_pgd(model, x, y, eps, alpha, steps, delta0):
    """Madry's loop written from the formula: x_adv <- Proj(x_adv + alpha * sign(grad_x L))."""
    x_adv = torch.min(torch.max(x + delta0, x - eps), x + eps).clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv.clone().detach().requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="mean")  # mean: same sign as sum
        loss.backward()
        step = x_adv + alpha * x_adv.grad.sign()
        x_adv = torch.min(torch.max(step, x - eps), x + eps).clamp(0, 1)
    model.zero_grad(set_to_none=True)
    return x_adv.detach()


def test_pgd_matches_reference_loop():
    model = tiny_model().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 1, 6, 6, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1])
    eps, alpha = 0.05, 0.02
    delta0 = (torch.rand(x.shape, generator=g) * 2 - 1) * eps
    ours = pgd_attack(model, x, y, eps=eps, step_size=alpha, steps=5, init_delta=delta0)
    ref = reference_pgd(model, x, y, eps, alpha, 5, delta0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert not torch.equal(ours, (x + delta0).clamp(0, 1))  # it did move


def test_pgd_random_start_is_seeded_and_uniform():
    model = tiny_model().eval()
    x = torch.full((64, 1, 6, 6), 0.5)
    y = torch.zeros(64, dtype=torch.long)
    a = pgd_attack(model, x, y, 0.1, 0.01, steps=0, generator=torch.Generator().manual_seed(3))
    b = pgd_attack(model, x, y, 0.1, 0.01, steps=0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    d = a - x
    assert d.abs().max() <= 0.1 + 1e-6 and d.min() < -0.09 and d.max() > 0.09
    assert abs(float(d.mean())) < 0.01  # U(-eps, eps) has mean 0
    no_start = pgd_attack(model, x, y, 0.1, 0.01, steps=0, random_start=False)
    torch.testing.assert_close(no_start, x)


def test_pgd_stays_in_ball_and_pixel_range():
    model = tiny_model().eval()
    x = torch.cat([torch.zeros(2, 1, 6, 6), torch.ones(2, 1, 6, 6), torch.rand(3, 1, 6, 6)])
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    eps = 8 / 255
    adv = pgd_attack(model, x, y, eps=eps, step_size=0.5, steps=3)  # a huge step must still be projected
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert not adv.requires_grad


@pytest.mark.parametrize("batch", [1, 3])
def test_pgd_no_side_effects_any_batch(batch):
    model = tiny_model().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(batch, 1, 6, 6)
    y = torch.zeros(batch, dtype=torch.long)
    adv = pgd_attack(model, x, y, PGDConfig().eps, PGDConfig().step_size, PGDConfig().steps)
    assert adv.shape == x.shape
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():  # eval mode: running stats untouched
        assert torch.equal(v, before[k]), k


def test_pgd_raises_loss_on_trained_model():
    torch.manual_seed(0)
    # two well separated classes: bright top half vs bright bottom half
    x = torch.rand(32, 1, 6, 6) * 0.3
    y = torch.arange(32) % 2
    x[y == 0, :, :3] += 0.3
    x[y == 1, :, 3:] += 0.3
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
    adv = PGDConfig(eps=0.1, step_size=0.03, steps=5)(model, x, y, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        robust = F.cross_entropy(model(adv), y)
        noisy = F.cross_entropy(model((x + 0.1 * torch.randn_like(x).sign()).clamp(0, 1)), y)
    assert robust > 2 * clean + 0.05
    assert robust > noisy
    assert all(p.grad is None for p in model.parameters())


def test_pgd_under_no_grad_and_inference_mode():
    model = tiny_model().eval()
    x = torch.rand(2, 1, 6, 6)
    y = torch.tensor([0, 1])
    delta0 = torch.zeros_like(x)
    expected = pgd_attack(model, x, y, 0.03, 0.01, 2, init_delta=delta0)
    with torch.no_grad():
        torch.testing.assert_close(pgd_attack(model, x, y, 0.03, 0.01, 2, init_delta=delta0), expected)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()  # inference tensors, as in Lightning's eval loops
        out = pgd_attack(model, xi, yi, 0.03, 0.01, 2, init_delta=delta0)
    torch.testing.assert_close(out, expected)
    with torch.inference_mode():
        frozen = tiny_model()
    with pytest.raises(RuntimeError, match="inference tensors"):
        pgd_attack(frozen, x, y, 0.03, 0.01, 1)


def test_pgd_bad_settings():
    model = tiny_model()
    x, y = torch.rand(1, 1, 6, 6), torch.tensor([0])
    with pytest.raises(ValueError, match="eps"):
        pgd_attack(model, x, y, eps=-1.0, step_size=0.1, steps=1)
    with pytest.raises(ValueError, match="steps"):
        PGDConfig(steps=-2)
    with pytest.raises(ValueError, match="init_delta"):
        pgd_attack(model, x, y, 0.1, 0.1, 1, init_delta=torch.zeros(2, 1, 6, 6))
