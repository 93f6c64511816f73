"""3D Swin Transformer encoder (SwinUNETR layout) with an optional learned mask token.

Tokens stay channels-last ``(B, D, H, W, C)`` inside the stages; the encoder returns
channels-first feature maps ``(B, C, D, H, W)`` at five scales (strides 2, 4, 8, 16, 32).
Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention` with the
relative position bias (and the shifted-window mask) as an additive float mask, except when training
on CPU, where plain matmul-softmax-matmul is faster (see :meth:`WindowAttention.forward`). The
cyclic shift and the window partition are one token gather (:func:`window_token_order`), computed
once per stage for its regular and its shifted blocks.

The preset's ``merge_order``, ``window_fit``, ``relative_position`` and ``patch_norm`` reproduce
encoders trained elsewhere (MONAI, SMIT) exactly; see :mod:`nnunet_ssl.networks.presets`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from nnunet_ssl.networks.presets import MERGE_ORDERS, SwinPreset

Size3 = tuple[int, int, int]

#: Additive logit for token pairs that must not attend to each other (Swin's convention);
#: finite, so fp16 stays finite, and far below any realistic attention logit.
MASKED_LOGIT = -100.0


def window_partition(x: Tensor, window: Size3) -> Tensor:
    """Split ``(B, D, H, W, C)`` into windows ``(B, nW, N, C)``, ``N = prod(window)``.

    The spatial size must be a multiple of ``window``.
    """
    b, d, h, w, c = x.shape
    x = x.view(b, d // window[0], window[0], h // window[1], window[1], w // window[2], window[2], c)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, -1, window[0] * window[1] * window[2], c)


def window_reverse(windows: Tensor, window: Size3, size: Size3) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B, nW, N, C)`` -> ``(B, D, H, W, C)``."""
    b, _, _, c = windows.shape
    d, h, w = size
    x = windows.view(b, d // window[0], h // window[1], w // window[2], window[0], window[1], window[2], c)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, d, h, w, c)


def relative_position_index(window: Size3, table_window: Size3) -> Tensor:
    """Index into a relative-position table built for ``table_window`` for tokens of ``window``.

    Returns a ``(N, N)`` long tensor, ``N = prod(window)``. Entry ``(i, j)`` encodes the offset of
    token ``i`` relative to token ``j``; ``window`` may be smaller than the table's window (a
    shrunken window at a small feature map), offsets then still address the right table rows.
    """
    axes = [torch.arange(n) for n in window]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij")).flatten(1)  # (3, N)
    offsets = coords[:, :, None] - coords[:, None, :]  # (3, N, N)
    spans = [2 * t - 1 for t in table_window]
    shifted = [offsets[a] + table_window[a] - 1 for a in range(3)]
    return shifted[0] * spans[1] * spans[2] + shifted[1] * spans[2] + shifted[2]


def _axis_regions(length: int, window: int, shift: int) -> Tensor:
    """Region id of every position along one axis of the cyclically shifted grid."""
    region = torch.zeros(length, dtype=torch.long)
    if shift > 0:
        region[length - window : length - shift] = 1
        region[length - shift :] = 2
    return region


def shifted_window_mask(size: Size3, window: Size3, shift: Size3, device: torch.device) -> Tensor:
    """Additive attention mask ``(nW, N, N)`` for shifted windows on a padded grid of ``size``.

    After rolling by ``-shift``, a window at the grid's end mixes tokens that were not neighbours
    in the original volume. Tokens from different regions get :data:`MASKED_LOGIT`, others 0.
    """
    regions = [_axis_regions(n, w, s) for n, w, s in zip(size, window, shift, strict=True)]
    label = regions[0][:, None, None] * 9 + regions[1][None, :, None] * 3 + regions[2][None, None, :]
    windows = window_partition(label[None, ..., None], window)[0, ..., 0]  # (nW, N)
    different = windows[:, :, None] != windows[:, None, :]
    mask = torch.zeros(different.shape, dtype=torch.float32)
    mask[different] = MASKED_LOGIT
    return mask.to(device)


def effective_window(size: Size3, window: int, shift: int, fit: str = "shrink") -> tuple[Size3, Size3]:
    """Window and shift of a stage on a grid of ``size``.

    With ``fit="shrink"`` (Swin, MONAI) the window shrinks to the grid and the shift is dropped along
    axes where the grid is not larger than the window; with ``fit="pad"`` (SMIT) both stay as they are
    and the grid is padded to a multiple of the window.
    """
    if fit == "pad":
        return (window, window, window), (shift, shift, shift)
    d, h, w = size
    eff_window = (min(d, window), min(h, window), min(w, window))
    eff_shift = (0 if d <= window else shift, 0 if h <= window else shift, 0 if w <= window else shift)
    return eff_window, eff_shift


def window_token_order(size: Size3, window: Size3, shift: Size3, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token permutation equal to rolling a grid by ``-shift`` and partitioning it into windows.

    For tokens ``t`` of shape ``(B, D*H*W, C)``, ``t[:, order]`` viewed as ``(B, nW, N, C)`` equals
    :func:`window_partition` of the grid rolled by ``-shift``; ``t[:, inverse]`` undoes it.

    Returns:
        ``(order, inverse)``, two long tensors of length ``D*H*W``.
    """
    d, h, w = size
    index = torch.arange(d * h * w, device=device).view(1, d, h, w, 1)
    if any(shift):
        index = torch.roll(index, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
    order = window_partition(index, window).reshape(-1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=device)
    return order, inverse


class _PermuteTokens(torch.autograd.Function):
    """``x[:, order]`` for a permutation ``order`` of dim 1; backward is the inverse gather.

    One copy each way, instead of a roll (one copy per shifted axis) plus a window partition, and
    a gather instead of the scatter-add that ``index_select``'s backward would use.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""

    relative_position_index: Tensor

    def __init__(
        self, dim: int, num_heads: int, window: int, qkv_bias: bool = True, relative_position: str = "exact"
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window = (window, window, window)
        self.relative_position = relative_position
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 3, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer(
            "relative_position_index", relative_position_index(self.window, self.window), persistent=False
        )

    def position_bias(self, window: Size3) -> Tensor:
        """Relative position bias ``(heads, N, N)`` for windows of the given (possibly shrunken) size.

        With ``relative_position="monai"`` a shrunken window takes rows ``[:N, :N]`` of the full window's
        index, as MONAI's ``WindowAttention.forward`` does (see :data:`~nnunet_ssl.networks.presets.RELATIVE_POSITIONS`).
        """
        if window == self.window:
            index = self.relative_position_index
        elif self.relative_position == "monai":
            n = window[0] * window[1] * window[2]
            index = self.relative_position_index[:n, :n]
        else:
            index = relative_position_index(window, self.window).to(self.relative_position_bias_table.device)
        n = index.shape[0]
        bias = self.relative_position_bias_table[index.reshape(-1)].view(n, n, self.num_heads)
        return bias.permute(2, 0, 1)

    def forward(self, x: Tensor, window: Size3, mask: Tensor | None) -> Tensor:
        """Attend within windows.

        Args:
            x: Windows ``(B, nW, N, C)``.
            window: Window size the tokens were partitioned with.
            mask: Shifted-window mask ``(nW, N, N)`` or None.

        Returns:
            ``(B, nW, N, C)``.
        """
        b, nw, n, c = x.shape
        qkv = self.qkv(x).view(b, nw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, nW, heads, N, d)
        bias = self.position_bias(window)  # (heads, N, N)
        if mask is not None:
            bias = bias[None] + mask[:, None]  # (nW, heads, N, N)
        bias = bias.to(q.dtype)
        if q.device.type == "cpu":
            # With a float mask (the position bias) CPU SDPA takes its math path, which adds extra
            # passes over the logits for a "safe" softmax: plain attention is faster there, 1.3x with
            # gradients and 1.4-2.4x without (teacher forwards, inference): benchmarks/bench_cpu_attention.py.
            logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            out = torch.softmax(logits + bias, dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(2, 3).reshape(b, nw, n, c)
        return self.proj(out)


class SwinBlock(nn.Module):
    """Pre-norm Swin block: (shifted) window attention and an MLP, both residual."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: float,
        relative_position: str = "exact",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias, relative_position)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self, x: Tensor, window: Size3, order: Tensor, inverse: Tensor, mask: Tensor | None
    ) -> Tensor:
        """Apply the block to tokens ``(B, D, H, W, C)``.

        Args:
            x: Tokens.
            window: Window size.
            order: Token order of the padded grid (:func:`window_token_order`, with this block's shift).
            inverse: Its inverse permutation.
            mask: Shifted-window mask ``(nW, N, N)`` or None.
        """
        b, d, h, w, c = x.shape
        y = self.norm1(x)
        pads = [(-n) % win for n, win in zip((d, h, w), window, strict=True)]
        if any(pads):
            y = F.pad(y, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        padded = (d + pads[0], h + pads[1], w + pads[2])
        # cyclic shift + window partition (and back) as one gather each way
        n = window[0] * window[1] * window[2]
        windows = _PermuteTokens.apply(y.reshape(b, -1, c), order, inverse).view(b, -1, n, c)
        y = _PermuteTokens.apply(self.attn(windows, window, mask).reshape(b, -1, c), inverse, order)
        y = y.view(b, *padded, c)
        if any(pads):
            y = y[:, :d, :h, :w].contiguous()
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Halve the resolution: concatenate each 2x2x2 neighbourhood, normalise, project 8C -> 2C.

    Args:
        dim: Token width ``C``.
        merge_order: Key of :data:`~nnunet_ssl.networks.presets.MERGE_ORDERS`: the order of the eight
            ``(d, h, w)`` sub-voxels in the concatenation (an order may repeat a sub-voxel, as MONAI's
            pre-1.5 ``PatchMerging`` does).
    """

    def __init__(self, dim: int, merge_order: str = "v2") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)
        offsets = MERGE_ORDERS[merge_order]
        self.merge_order = merge_order
        # position of each concatenated sub-voxel in the (d, h, w)-major order of the plain view below;
        # None for that order itself, the fast path
        positions = [i * 4 + j * 2 + k for i, j, k in offsets]
        self.sub_voxels: Tensor | None
        if positions == list(range(8)):
            self.sub_voxels = None
        else:
            self.register_buffer("sub_voxels", torch.tensor(positions), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, D, H, W, C)`` -> ``(B, ceil(D/2), ceil(H/2), ceil(W/2), 2C)``."""
        b, d, h, w, c = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
            b, d, h, w, c = x.shape
        x = x.view(b, d // 2, 2, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
        if self.sub_voxels is not None:
            x = x.reshape(b, d // 2, h // 2, w // 2, 8, c).index_select(4, self.sub_voxels)
        x = x.reshape(b, d // 2, h // 2, w // 2, 8 * c)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """A stage of Swin blocks (alternating regular and shifted windows) followed by a merge."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_paths: list[float],
        gradient_checkpointing: bool,
        merge_order: str = "v2",
        window_fit: str = "shrink",
        relative_position: str = "exact",
    ) -> None:
        super().__init__()
        self.window = window
        self.window_fit = window_fit
        self.gradient_checkpointing = gradient_checkpointing
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, mlp_ratio, qkv_bias, drop_paths[i], relative_position)
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim, merge_order)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, D, H, W, C)`` tokens -> merged tokens at half resolution."""
        _, d, h, w, _ = x.shape
        window, shift = effective_window((d, h, w), self.window, self.window // 2, self.window_fit)
        padded = (d + (-d) % window[0], h + (-h) % window[1], w + (-w) % window[2])
        mask = shifted_window_mask(padded, window, shift, x.device) if any(shift) else None
        # token orders (window partition, and roll + partition), once for all blocks of the stage
        plain = window_token_order(padded, window, (0, 0, 0), x.device)
        shifted = window_token_order(padded, window, shift, x.device) if any(shift) else plain
        for i, block in enumerate(self.blocks):
            (order, inverse), block_mask = (shifted, mask) if i % 2 else (plain, None)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, window, order, inverse, block_mask, use_reentrant=False)
            else:
                x = block(x, window, order, inverse, block_mask)
        return self.downsample(x)


class SwinEncoder(nn.Module):
    """Patch embedding, optional mask token and four Swin stages.

    Args:
        preset: Architecture shape.
        in_channels: Input image channels.
        use_mask_token: Add a learned token that replaces masked patches (SSL pretraining).
    """

    def __init__(self, preset: SwinPreset, in_channels: int = 1, use_mask_token: bool = False) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.preset = preset
        self.in_channels = in_channels
        self.patch_embed = nn.Conv3d(
            in_channels, preset.embed_dim, kernel_size=preset.patch_size, stride=preset.patch_size
        )
        self.patch_norm = nn.LayerNorm(preset.embed_dim) if preset.patch_norm else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, 1, preset.embed_dim)) if use_mask_token else None
        total = sum(preset.depths)
        rates = [preset.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.ModuleList()
        start = 0
        for i, depth in enumerate(preset.depths):
            self.stages.append(
                SwinStage(
                    preset.stage_dims[i],
                    depth,
                    preset.num_heads[i],
                    preset.window_size,
                    preset.mlp_ratio,
                    preset.qkv_bias,
                    rates[start : start + depth],
                    preset.gradient_checkpointing,
                    preset.merge_order,
                    preset.window_fit,
                    preset.relative_position,
                )
            )
            start += depth
        self.apply(_init_swin_weights)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def embed(self, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
        """Patch-embed ``(B, C, D, H, W)`` into tokens ``(B, D/2, H/2, W/2, E)``, masking if asked.

        With ``patch_norm`` the tokens are layer-normalised before masking, as in SMIT's masked student.

        Args:
            x: Image batch.
            token_mask: ``(B, D/2, H/2, W/2)`` bool/0-1 tensor; 1 marks a patch to replace by the mask token.
        """
        tokens = self.patch_embed(x).permute(0, 2, 3, 4, 1)
        if self.patch_norm is not None:
            tokens = self.patch_norm(tokens)
        if token_mask is None:
            return tokens
        if self.mask_token is None:
            raise ValueError("this encoder was built without a mask token (use_mask_token=False)")
        if token_mask.shape != tokens.shape[:4]:
            raise ValueError(f"token mask shape {tuple(token_mask.shape)} != token grid {tuple(tokens.shape[:4])}")
        m = token_mask.to(tokens.dtype).unsqueeze(-1)
        return tokens * (1 - m) + self.mask_token.to(tokens.dtype) * m

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> list[Tensor]:
        """Encode an image batch.

        Args:
            x: ``(B, C, D, H, W)`` with every spatial axis a multiple of 32.
            token_mask: Optional ``(B, D/2, H/2, W/2)`` patch mask (see :meth:`embed`).

        Returns:
            Five layer-normalised feature maps ``(B, E * 2**i, D / 2**(i+1), ...)``, i = 0..4.
        """
        tokens = self.embed(x, token_mask)
        features = [_normalize_channels_last(tokens)]
        for stage in self.stages:
            tokens = stage(tokens)
            features.append(_normalize_channels_last(tokens))
        return features


def _normalize_channels_last(tokens: Tensor) -> Tensor:
    """Affine-free layer norm over channels, returned channels-first ``(B, C, D, H, W)``."""
    out = F.layer_norm(tokens, tokens.shape[-1:])
    return out.permute(0, 4, 1, 2, 3)


def _init_swin_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
