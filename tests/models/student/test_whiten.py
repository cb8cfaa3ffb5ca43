"""Whiten (icefall's gradient-only whitening regulariser on Zipformer2 layer outputs)."""

from __future__ import annotations

import pytest
import torch

from spear.config import StudentConfig
from spear.models.student import build_encoder
from spear.models.student.zipformer import Whiten, whitening_metric


def _collapsed(n: int = 300, dim: int = 16, rank: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, dim, generator=g) + 0.01 * torch.randn(n, dim, generator=g)


def test_whitening_metric_is_one_for_white_frames_and_dim_for_one_direction():
    g = torch.Generator().manual_seed(0)
    assert float(whitening_metric(torch.randn(20000, 8, generator=g))) == pytest.approx(1.0, abs=0.05)
    line = torch.randn(500, 1, generator=g) * torch.randn(1, 8, generator=g)
    assert float(whitening_metric(line)) == pytest.approx(8.0, rel=1e-3)


def test_whiten_is_identity_forward_and_adds_a_gradient_only_above_the_limit():
    x = _collapsed().requires_grad_(True)
    task = torch.randn(1, 300, 16)
    w = Whiten(limit=4.0, grad_scale=0.1, prob=1.0).train()
    y = w(x.unsqueeze(0), None)
    assert torch.equal(y.squeeze(0), x)
    (y * task).sum().backward()
    extra = x.grad - task.squeeze(0)
    # The added gradient is grad_scale times the task gradient's norm, and it lowers the metric.
    assert float(extra.norm()) == pytest.approx(0.1 * float(task.norm()), rel=1e-4)
    stepped = x.detach() - 1e-3 * extra / extra.norm() * x.detach().norm()
    assert float(whitening_metric(stepped)) < float(whitening_metric(x.detach()))
    # Below the limit (a white batch) or in eval mode: the task gradient only.
    white = torch.randn(300, 16).requires_grad_(True)
    (w(white.unsqueeze(0), None) * task).sum().backward()
    assert torch.equal(white.grad, task.squeeze(0))
    x.grad = None
    (w.eval()(x.unsqueeze(0), None) * task).sum().backward()
    assert torch.equal(x.grad, task.squeeze(0))


def test_whiten_ignores_padded_frames():
    x = _collapsed(n=40).unsqueeze(0)
    pad = torch.zeros(1, 40, dtype=torch.bool)
    pad[0, 30:] = True
    padded = torch.cat([x[:, :30], torch.full((1, 10, 16), 1e3)], 1).requires_grad_(True)
    task = torch.randn(1, 40, 16)
    (Whiten(4.0, 0.1, 1.0).train()(padded, pad) * task).sum().backward()
    assert torch.equal(padded.grad[0, 30:], task[0, 30:])  # padding gets the task gradient only
    clean = x[:, :30].clone().requires_grad_(True)
    (Whiten(4.0, 0.1, 1.0).train()(clean, None) * task[:, :30]).sum().backward()
    # The valid frames get what they would get alone (the extra gradient is sized on their own gradient).
    torch.testing.assert_close(padded.grad[0, :30] - task[0, :30], (clean.grad - task[:, :30])[0], rtol=1e-4, atol=1e-6)


def test_student_config_turns_whitening_on_for_zipformer2_only():
    on = build_encoder(StudentConfig(num_mel_bins=40, whitening_limit=4.0, whitening_prob=1.0))
    assert all(layer.whiten.limit == 4.0 and layer.whiten.prob == 1.0
               for stack in on.stacks for layer in stack.layers)
    off = build_encoder(StudentConfig(num_mel_bins=40))
    assert all(layer.whiten.limit == 0.0 for stack in off.stacks for layer in stack.layers)
    assert set(on.state_dict()) == set(off.state_dict())  # no parameters: checkpoints are unchanged
    with pytest.raises(ValueError, match="whitening_limit applies to the zipformer2 student only"):
        StudentConfig(architecture="transformer", whitening_limit=4.0)


def test_whitening_keeps_a_training_step_finite_and_changes_only_gradients():
    torch.manual_seed(0)
    enc = build_encoder("zipformer2", "tiny", num_mel_bins=40, whitening_limit=1.0, whitening_prob=1.0,
                        whitening_grad_scale=0.5, dropout=0.0).train()
    ref = build_encoder("zipformer2", "tiny", num_mel_bins=40, dropout=0.0).train()
    ref.load_state_dict(enc.state_dict())
    feats, lengths = torch.randn(2, 120, 40), torch.tensor([120, 90])
    a, b = enc(feats, lengths), ref(feats, lengths)
    torch.testing.assert_close(a.frames, b.frames)
    a.frames.sum().backward()
    b.frames.sum().backward()
    grads = [(p.grad, q.grad) for p, q in zip(enc.parameters(), ref.parameters()) if p.grad is not None]
    assert all(torch.isfinite(g).all() for g, _ in grads)
    assert any(not torch.allclose(g, h) for g, h in grads)
