"""DINO projection head, 3D pixel shuffle and the linear pixel head."""
from __future__ import annotations

import pytest
import torch

from nnunet_ssl.pretraining.heads import DINOHead, LinearPixelHead, pixel_shuffle_3d


def test_pixel_shuffle_3d_hand_case() -> None:
    x = torch.arange(8.0).view(1, 8, 1, 1, 1)
    expected = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[4.0, 5.0], [6.0, 7.0]]])
    assert torch.equal(pixel_shuffle_3d(x, 2), expected.view(1, 1, 2, 2, 2))


def test_pixel_shuffle_3d_against_index_formula() -> None:
    r, c = 2, 3
    x = torch.randn(2, c * r**3, 2, 3, 1)
    out = pixel_shuffle_3d(x, r)
    assert out.shape == (2, c, 4, 6, 2)
    for b in range(2):
        for ch in range(c):
            for d in range(2):
                for h in range(3):
                    for i in range(r):
                        for j in range(r):
                            for k in range(r):
                                src = x[b, ch * r**3 + i * r * r + j * r + k, d, h, 0]
                                assert out[b, ch, d * r + i, h * r + j, k] == src
    with pytest.raises(ValueError):
        pixel_shuffle_3d(torch.zeros(1, 7, 1, 1, 1), 2)


def test_linear_pixel_head_shapes_and_size() -> None:
    head = LinearPixelHead(24, stride=4, out_channels=2)
    assert head(torch.randn(3, 24, 2, 1, 2)).shape == (3, 2, 8, 4, 8)
    full = LinearPixelHead(768, stride=32)
    assert sum(p.numel() for p in full.parameters()) == 768 * 32**3 + 32**3  # about 25 M


def test_dino_head_shapes_and_token_independence() -> None:
    torch.manual_seed(0)
    head = DINOHead(16, out_dim=32, hidden=64, bottleneck=8)
    tokens = torch.randn(2, 5, 16)
    out = head(tokens)
    assert out.shape == (2, 5, 32)
    torch.testing.assert_close(out, head(tokens.reshape(10, 16)).reshape(2, 5, 32))


def test_dino_head_last_layer_is_normalised_with_fixed_gain() -> None:
    torch.manual_seed(0)
    head = DINOHead(16, out_dim=32, hidden=64, bottleneck=8)
    x = torch.randn(4, 16)
    out = head(x)
    assert out.abs().max() <= 1.0 + 1e-6  # cosine between unit bottleneck and unit prototypes
    with torch.no_grad():
        head.last_layer.weight.mul_(7.0)  # the gain is fixed at 1: scale has no effect
    torch.testing.assert_close(head(x), out)
    assert head.last_layer.bias is None
    assert all(p.requires_grad for p in head.parameters())
    assert sum(p.numel() for p in head.parameters()) == 16 * 64 + 64 + 64 * 64 + 64 + 64 * 8 + 8 + 8 * 32


def test_dino_head_init() -> None:
    torch.manual_seed(0)
    head = DINOHead(384, out_dim=64)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [2048, 2048, 256]
    for m in linears:
        assert m.weight.std().item() == pytest.approx(0.02, rel=0.15)
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
    out = head(torch.randn(3, 384))
    out.sum().backward()
    assert head.last_layer.weight.grad is not None and head.last_layer.weight.grad.abs().sum() > 0
