"""CLIP and SigLIP objectives equal open_clip's losses (values and gradients)."""
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from vlp.objectives import build_objective


def _feats(n=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return x.requires_grad_(), y.requires_grad_()


def _grads(loss, *ts):
    return torch.autograd.grad(loss, ts)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_infonce_equals_open_clip(smoothing):
    x, y = _feats()
    scale = torch.tensor([12.5], dtype=torch.float64, requires_grad=True)
    ours = build_objective({"name": "infonce", "label_smoothing": smoothing})
    loss = ours.cross_sample({"image": x, "text": y}, {"logit_scale": scale})["loss"]
    if smoothing:
        # open_clip's ClipLoss has no smoothing: compare with torch's own
        logits = scale * x @ y.T
        labels = torch.arange(len(x))
        ref = (F.cross_entropy(logits, labels, label_smoothing=smoothing)
               + F.cross_entropy(logits.T, labels, label_smoothing=smoothing)) / 2
    else:
        ref = ClipLoss()(x, y, scale)
    assert torch.allclose(loss, ref, rtol=1e-12)
    for a, b in zip(_grads(loss, x, y, scale), _grads(ref, x, y, scale)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_siglip_equals_open_clip():
    x, y = _feats()
    scale = torch.tensor([10.0], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([-10.0], dtype=torch.float64, requires_grad=True)
    loss = build_objective({"name": "siglip"}).cross_sample(
        {"image": x, "text": y}, {"logit_scale": scale, "logit_bias": bias}
    )["loss"]
    ref = SigLipLoss()(x, y, scale, bias)
    assert torch.allclose(loss, ref, rtol=1e-12)
    for a, b in zip(_grads(loss, x, y, scale, bias), _grads(ref, x, y, scale, bias)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_siglip_without_bias_is_clear_error():
    x, y = _feats()
    with pytest.raises(ValueError, match="init_logit_bias"):
        build_objective({"name": "siglip"}).cross_sample({"image": x, "text": y}, {"logit_scale": torch.ones(1)})
