"""Named architecture presets for the Swin encoder + SwinUNETR decoder.

A preset fixes the encoder shape; the decoder width follows ``embed_dim`` (SwinUNETR's
``feature_size``). Make variants with :func:`dataclasses.replace`, never with subclasses.
"""
from __future__ import annotations

from dataclasses import dataclass

#: Sub-voxel order in which :class:`~nnunet_ssl.networks.swin.PatchMerging` concatenates each 2x2x2
#: neighbourhood of tokens ``(B, D, H, W, C)``, as ``(d, h, w)`` offsets. The reduction weights of a
#: checkpoint only mean something in the order it was trained with:
#:
#: * ``"v2"``: ``itertools.product`` order, d slowest (ours, and MONAI's ``downsample="mergingv2"``,
#:   ``PatchMergingV2`` in monai/networks/nets/swin_unetr.py since MONAI 0.9.1, commit 356d2d2f4).
#: * ``"monai_merging"``: MONAI's ``downsample="merging"`` (``PatchMerging``) since MONAI 1.5
#:   (commit 1c00ea22e, "Fix PatchMerging duplicate merging", January 2025).
#: * ``"monai_merging_v09"``: MONAI's ``PatchMerging`` before that fix (MONAI 0.9.0 to 1.4), which
#:   concatenates (0,1,0) and (0,0,1) twice and drops (1,1,0) and (0,1,1). It is the merge of the MONAI
#:   code the public self-supervised ``model_swinvit.pt`` was released for and is fine-tuned with
#:   (research-contributions SwinUNETR/BTCV pins MONAI@07de215c, whose swin_unetr.py has this order).
#: * ``"smit"``: the SMIT authors' ``PatchMerging`` (The-Veeraraghavan-Lab/SMIT, models/Trans.py).
MERGE_ORDERS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "v2": ((0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)),
    "monai_merging": ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)),
    "monai_merging_v09": ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)),
    "smit": ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1), (1, 1, 1)),
}

#: How a stage whose token grid is not larger than the window along an axis attends:
#:
#: * ``"shrink"``: the window shrinks to the grid and the shift is dropped on that axis (Swin,
#:   MONAI's ``get_window_size``).
#: * ``"pad"``: the window keeps its size, the grid is zero-padded to a multiple of it and shifted
#:   windows stay shifted (SMIT's ``BasicLayer``/``SwinTransformerBlock``, models/Trans.py).
WINDOW_FITS = ("shrink", "pad")

#: Which relative-position bias a shrunken window gets:
#:
#: * ``"exact"``: the table rows of the true offsets between its tokens (ours).
#: * ``"monai"``: rows ``[:n, :n]`` of the full window's index, ``n`` = tokens per shrunken window, as
#:   MONAI's ``WindowAttention.forward`` slices ``relative_position_index`` (since its first version,
#:   commit e093d0b15). These rows belong to the first ``n`` tokens of a full window, so the offsets differ
#:   from the true ones; weights trained with MONAI expect them.
RELATIVE_POSITIONS = ("exact", "monai")

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
        merge_order: Sub-voxel order of the patch merging, a key of :data:`MERGE_ORDERS`.
        window_fit: Window handling on grids not larger than the window, one of :data:`WINDOW_FITS`.
        relative_position: Position bias of shrunken windows, one of :data:`RELATIVE_POSITIONS`.
        patch_norm: Layer norm after the patch embedding (SMIT's ``patch_norm=True``).
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
    merge_order: str = "v2"
    window_fit: str = "shrink"
    relative_position: str = "exact"
    patch_norm: bool = False

    def __post_init__(self) -> None:
        if self.merge_order not in MERGE_ORDERS:
            raise ValueError(f"preset {self.name!r}: merge_order must be one of {sorted(MERGE_ORDERS)}")
        if self.window_fit not in WINDOW_FITS:
            raise ValueError(f"preset {self.name!r}: window_fit must be one of {WINDOW_FITS}")
        if self.relative_position not in RELATIVE_POSITIONS:
            raise ValueError(f"preset {self.name!r}: relative_position must be one of {RELATIVE_POSITIONS}")
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
        return tuple(self.embed_dim * 2**i for i in range(4))

    @property
    def feature_dims(self) -> tuple[int, int, int, int, int]:
        """Channels of the five encoder outputs (patch embedding, then after each merge)."""
        return tuple(self.embed_dim * 2**i for i in range(5))


PRESETS: dict[str, SwinPreset] = {
    "smit": SwinPreset("smit", embed_dim=48, depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16)),
    "smit128": SwinPreset("smit128", embed_dim=48, depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16), input_size=128),
    "smit_s": SwinPreset("smit_s", embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "smit_p": SwinPreset("smit_p", embed_dim=128, depths=(2, 2, 40, 4), num_heads=(4, 8, 16, 32)),
    "monai": SwinPreset("monai", embed_dim=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7),
    # Weights from elsewhere (`nnunet-ssl convert`): MONAI's SwinUNETR encoder (feature_size 48, window 7)
    # with the merge of each MONAI version and MONAI's position-bias slicing, and the SMIT authors' public
    # configuration (models/configs_Trans.py, get_3DTransSmall_config_Unetr: embed 48, depths 2-2-4-2,
    # heads 4-4-4-4, window 4, qkv_bias False, patch_norm True).
    "monai_ssl": SwinPreset(
        "monai_ssl", embed_dim=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7,
        merge_order="monai_merging_v09", relative_position="monai",
    ),
    "monai_merging": SwinPreset(
        "monai_merging", embed_dim=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7,
        merge_order="monai_merging", relative_position="monai",
    ),
    "monai_v2": SwinPreset(
        "monai_v2", embed_dim=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7,
        relative_position="monai",
    ),
    "smit_public": SwinPreset(
        "smit_public", embed_dim=48, depths=(2, 2, 4, 2), num_heads=(4, 4, 4, 4), window_size=4, qkv_bias=False,
        merge_order="smit", window_fit="pad", patch_norm=True,
    ),
    "tiny": SwinPreset("tiny", embed_dim=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), input_size=64),
}


def get_preset(name: str) -> SwinPreset:
    """Look up a preset by name with an error that lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
