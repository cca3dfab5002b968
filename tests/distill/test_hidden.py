import pytest
import torch

from slmkit.distill.hidden import HiddenStateLoss, default_layer_map, parse_layer_map
from slmkit.distill.kd_losses import KDError


def _hidden(n_layers, width, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, width, generator=g) for _ in range(n_layers + 1)]  # L inputs + final output


def test_default_layer_map():
    assert default_layer_map(2, 4) == [(0, 1), (1, 3)]
    assert default_layer_map(3, 6) == [(0, 1), (1, 3), (2, 5)]
    assert default_layer_map(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert default_layer_map(4, 10) == [(0, 2), (1, 4), (2, 7), (3, 9)]  # 2.5 and 7.5 round half up
    for n_s, n_t in [(1, 1), (3, 32), (5, 2), (8, 3)]:
        m = default_layer_map(n_s, n_t)
        assert m[-1] == (n_s - 1, n_t - 1) and all(0 <= t < n_t for _, t in m)
        assert [t for _, t in m] == sorted(t for _, t in m)


def test_parse_layer_map():
    assert parse_layer_map("0:1, 1:3,2:5", 3, 6) == [(0, 1), (1, 3), (2, 5)]
    with pytest.raises(KDError, match=r"student has 4 layers \(0\.\.3\); map names 7"):
        parse_layer_map("0:1,7:2", 4, 6)
    with pytest.raises(KDError, match=r"teacher has 6 layers \(0\.\.5\); map names 6"):
        parse_layer_map("0:6", 4, 6)
    with pytest.raises(KDError, match="student:teacher"):
        parse_layer_map("0-1", 4, 6)
    with pytest.raises(KDError, match="no layer pairs"):
        parse_layer_map(" ", 4, 6)


def test_zero_when_states_match_and_widths_equal():
    loss_fn = HiddenStateLoss(8, 8, default_layer_map(2, 2))
    assert len(list(loss_fn.parameters())) == 0
    h = _hidden(2, 8, seed=0)
    assert loss_fn(h, h).item() == 0.0
    assert loss_fn(h, _hidden(2, 8, seed=1)).item() > 0


def test_uses_layer_outputs_and_is_width_normalised():
    # Student layer 0's output is hidden[1]; matching that alone (not hidden[0]) gives zero.
    teacher = _hidden(4, 8, seed=2)
    student = [torch.zeros(2, 3, 8), teacher[2].clone(), torch.zeros(2, 3, 8)]
    assert HiddenStateLoss(8, 8, [(0, 1)])(student, teacher).item() == 0.0
    # Predicting zeros costs exactly 1 whatever the width or scale of the teacher states.
    for width, scale in [(4, 1.0), (64, 30.0)]:
        t = [x * scale for x in _hidden(1, width, seed=3)]
        s = [torch.zeros_like(x) for x in t]
        assert HiddenStateLoss(width, width, [(0, 0)])(s, t).item() == pytest.approx(1.0)


def test_learned_maps_when_widths_differ_get_gradients():
    loss_fn = HiddenStateLoss(6, 10, [(0, 1), (1, 3)])
    assert len(loss_fn.proj) == 2 and all(p.weight.shape == (10, 6) and p.bias is None for p in loss_fn.proj)
    student = [h.requires_grad_() for h in _hidden(2, 6, seed=4)]
    teacher = [h.requires_grad_() for h in _hidden(4, 10, seed=5)]
    loss = loss_fn(student, teacher)
    loss.backward()
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in loss_fn.proj)
    assert student[1].grad is not None and student[2].grad is not None
    assert all(h.grad is None for h in teacher)  # the teacher is frozen


def test_too_few_hidden_states():
    loss_fn = HiddenStateLoss(4, 4, [(2, 0)])
    with pytest.raises(KDError, match="return_hidden_states=True"):
        loss_fn(_hidden(1, 4, seed=6), _hidden(1, 4, seed=7))
