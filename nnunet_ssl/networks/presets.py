"""Named architecture presets for the Swin encoder + SwinUNETR decoder.

A preset fixes the encoder shape; the decoder width follows ``embed_dim`` (SwinUNETR's
``feature_size``). Make variants with :func:`dataclasses.replace`, never with subclasses.
"""
from __future__ import annotations

from dataclasses import dataclass

#: Total down-sampling of the encoder (patch embedding 2 x four merges of 2 = 32, counting the
#: last merge that produces the bottleneck). Every input axis must be a multiple of this.
ENCODER_STRIDE = 32


@dataclass(frozen=True)
class SwinPreset:
    """Shape of a 3D Swin encoder and its SwinUNETR decoder.

    Attributes:
        name: Key in :data:`PRESETS`.
        embed_dim: Width of the patch embedding (SwinUNETR ``feature_size``).
        depths: Swin blocks per stage (four stages).
        num_heads: Attention heads per stage.
        window_size: Attention window edge in tokens.
        patch_size: Patch embedding stride/kernel.
        mlp_ratio: Hidden width of the MLP relative to the token width.
        qkv_bias: Bias in the qkv projection.
        drop_path_rate: Stochastic depth at the last block (linearly increasing).
        input_size: Cubic patch edge the preset is designed for (nnU-Net patch size in ``nnunet-ssl plan``).
        gradient_checkpointing: Recompute Swin blocks and high-resolution decoder blocks in backward.
    """

    name: str
    embed_dim: int
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    window_size: int = 4
    patch_size: int = 2
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    input_size: int = 96
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError(f"preset {self.name!r}: depths and num_heads need four stages")
        for stage, heads in enumerate(self.num_heads):
            width = self.stage_dims[stage]
            if width % heads:
                raise ValueError(
                    f"preset {self.name!r}: stage {stage} width {width} is not divisible by {heads} heads"
                )
        if self.patch_size != 2:
            raise ValueError(f"preset {self.name!r}: only patch_size 2 is supported (total stride 32)")

    @property
    def stage_dims(self) -> tuple[int, int, int, int]:
        """Token width inside each of the four stages."""
        return tuple(self.embed_dim * 2**i for i in range(4))  # type: ignore[return-value]

    @property
    def feature_dims(self) -> tuple[int, int, int, int, int]:
        """Channels of the five encoder outputs (patch embedding, then after each merge)."""
        return tuple(self.embed_dim * 2**i for i in range(5))  # type: ignore[return-value]


PRESETS: dict[str, SwinPreset] = {
    "smit": SwinPreset("smit", embed_dim=48, depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16)),
    "smit128": SwinPreset("smit128", embed_dim=48, depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16), input_size=128),
    "smit_s": SwinPreset("smit_s", embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "smit_p": SwinPreset("smit_p", embed_dim=128, depths=(2, 2, 40, 4), num_heads=(4, 8, 16, 32)),
    "monai": SwinPreset("monai", embed_dim=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "tiny": SwinPreset("tiny", embed_dim=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), input_size=64),
}


def get_preset(name: str) -> SwinPreset:
    """Look up a preset by name with an error that lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
