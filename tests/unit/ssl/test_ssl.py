import math

import numpy as np
import pytest
import torch

from hipt_ray.models import create_model
from hipt_ray.ssl import (
    DINOHead,
    DINOLoss,
    GridCrops,
    MultiCrop,
    PixelCrops,
    cancel_last_layer_gradients,
    cosine_schedule,
    ema_update,
    teacher_temperature_schedule,
)


def _softmax(v):
    e = [math.exp(x - max(v)) for x in v]
    return [x / sum(e) for x in e]


def test_dino_loss_equals_hand_computation_and_updates_center():
    # 2 global crops + 1 local crop, batch 1, 3 prototypes
    s = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 2.0, 1.0]]
    t = [[2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    loss_fn = DINOLoss(out_dim=3, student_temp=0.1, center_momentum=0.9)
    loss = loss_fn(torch.tensor(s), torch.tensor(t), teacher_temp=0.04)
    # by hand: pairs (teacher 0, student 1), (0, 2), (1, 0), (1, 2); centre is 0 before the update
    q = [_softmax([x / 0.04 for x in row]) for row in t]
    logp = [[math.log(p) for p in _softmax([x / 0.1 for x in row])] for row in s]
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    expect = sum(-sum(qi * lp for qi, lp in zip(q[a], logp[b])) for a, b in pairs) / len(pairs)
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    center = [0.1 * (t[0][k] + t[1][k]) / 2 for k in range(3)]
    assert loss_fn.center[0].tolist() == pytest.approx(center, rel=1e-6)
    # the next call centres the teacher with it
    loss_fn(torch.tensor(s), torch.tensor(t), teacher_temp=0.04)
    assert loss_fn.center[0].tolist() == pytest.approx([0.9 * c + 0.1 * c * 10 for c in center], rel=1e-5)


def test_ema_update():
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(student, teacher, momentum=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    ema_update(student, teacher, momentum=0.5)
    for b, s, t in zip(before, student.parameters(), teacher.parameters()):
        assert torch.allclose(t, 0.5 * b + 0.5 * s)
    ema_update(student, teacher, momentum=0.0)
    assert all(torch.equal(s, t) for s, t in zip(student.parameters(), teacher.parameters()))


def test_schedule_is_the_published_dino_cosine_scheduler():
    # facebookresearch/dino utils.cosine_scheduler (HIPT's copy is byte-identical), values worked
    # out by hand for 10 epochs x 5 steps with 2 warm-up epochs: the warm-up linspace includes
    # its end point, the cosine runs over i / n for i < n, so it never quite reaches the final value.
    lr = cosine_schedule(5e-4, 1e-6, epochs=10, steps_per_epoch=5, warmup_epochs=2)
    assert len(lr) == 50
    assert lr[0] == 0.0 and lr[1] == pytest.approx(5e-4 / 9) and lr[9] == pytest.approx(5e-4)
    assert lr[10] == pytest.approx(5e-4)  # cosine at i = 0
    assert lr[-1] == pytest.approx(1e-6 + 0.5 * (5e-4 - 1e-6) * (1 + math.cos(math.pi * 39 / 40)))
    assert lr[-1] == pytest.approx(1.769e-6, abs=1e-9)
    wd = cosine_schedule(0.04, 0.4, epochs=10, steps_per_epoch=5)
    assert wd[32] == pytest.approx(0.04 + 0.5 * (0.4 - 0.04) * (1 - math.cos(math.pi * 32 / 50)))
    mom = cosine_schedule(0.996, 1.0, epochs=10, steps_per_epoch=5)
    assert mom[0] == 0.996 and mom[-1] == pytest.approx(1.0 - 0.002 * (1 + math.cos(math.pi * 49 / 50)))
    assert np.all(np.diff(lr[10:]) <= 0) and np.all(np.diff(lr[:10]) > 0)
    temp = teacher_temperature_schedule(0.04, 0.07, epochs=3, steps_per_epoch=4, warmup_epochs=2)
    assert temp[0] == pytest.approx(0.04) and temp[7] == pytest.approx(0.07) and set(temp[8:]) == {0.07}


def test_head_shapes_frozen_gain_and_first_epoch_freeze():
    head = DINOHead(in_dim=48, out_dim=100, hidden_dim=64, bottleneck_dim=16)
    out = head(torch.randn(5, 48))
    assert out.shape == (5, 100)
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.all(gain == 1)
    # with unit gain every prototype has norm 1, so |logit| ≤ 1 for the normalised bottleneck
    assert out.abs().max() <= 1 + 1e-5
    out.sum().backward()
    cancel_last_layer_gradients(head, epoch=0)
    assert head.last_layer.parametrizations.weight.original1.grad is None
    assert head.mlp[0].weight.grad is not None
    out = head(torch.randn(5, 48))
    out.sum().backward()
    cancel_last_layer_gradients(head, epoch=1)
    assert head.last_layer.parametrizations.weight.original1.grad is not None


def test_multicrop_batches_equal_sizes_and_matches_per_crop():
    torch.manual_seed(0)
    wrapper = MultiCrop(
        create_model("vit256_tiny").eval(), DINOHead(in_dim=48, out_dim=10, hidden_dim=16, bottleneck_dim=8).eval()
    )
    crops = [torch.randn(2, 3, 224, 224) for _ in range(2)] + [torch.randn(2, 3, 96, 96) for _ in range(3)]
    with torch.no_grad():
        out = wrapper(crops)
        each = torch.cat([wrapper.head(wrapper.backbone(c)) for c in crops])
    assert out.shape == (10, 10) and torch.allclose(out, each, atol=1e-5)


def test_grid_crops_shapes_and_stay_inside_the_grid():
    grid = torch.arange(16 * 16, dtype=torch.float32).reshape(1, 16, 16).expand(4, 16, 16)
    crops = GridCrops(n_local=8, rotate=True, generator=torch.Generator().manual_seed(1))(grid)
    assert [tuple(c.shape) for c in crops] == [(4, 14, 14)] * 2 + [(4, 6, 6)] * 8
    windows = {
        size: [
            set(grid[0, i : i + size, j : j + size].flatten().tolist())
            for i in range(17 - size)
            for j in range(17 - size)
        ]
        for size in (14, 6)
    }
    for c in crops:  # each crop is a (flipped/rotated) contiguous window of the grid
        assert set(c[0].flatten().tolist()) in windows[c.shape[-1]]
    with pytest.raises(ValueError, match="does not fit"):
        GridCrops(global_size=14)(torch.zeros(4, 6, 6))


def test_pixel_crops_shapes_and_normalisation():
    torch.manual_seed(0)
    patch = torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8)
    crops = PixelCrops(n_local=8)(patch)
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8
    assert all(c.dtype == torch.float32 and c.min() >= -1 and c.max() <= 1 for c in crops)
