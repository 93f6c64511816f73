"""Input-channel adaptation of the patch-embedding stem (``patch_embed.weight``, ``(E, C, k, k, k)``).

Weights pretrained on one channel (CT) load into a network with ``C`` channels (multi-sequence MRI,
CT + a second contrast) and back. Only the stem kernel depends on the channel count; its bias and
every later layer are unchanged. Modes (``--channels`` of ``nnunet-ssl export``):

* ``replicate`` (default): every target channel gets the mean of the source kernels, scaled so that
  an image repeated in every channel gives the stem response of the source network (timm's
  ``adapt_input_conv`` rule). From one channel: the kernel copied ``C`` times and scaled by ``1/C``.
* ``first``: target channel 0 gets source channel 0's kernel unchanged, every other target channel
  zeros: the network responds to channel 0 exactly as the source network did and ignores the rest
  until fine-tuning gives them weight.
* ``mean``: many to fewer (typically to one): the source kernels are averaged and rescaled the same
  way as ``replicate`` (``W_target = sum_c W_c / C_target``), so a ``C``-channel encoder becomes a
  one-channel encoder whose response to ``x`` equals the source's response to ``x`` in every
  channel. ``replicate`` then ``mean`` returns the original one-channel kernel.

``replicate`` needs a one-channel source (or equal counts); ``mean`` needs fewer target channels
than source channels; ``first`` works for any counts. Equal counts are never changed.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor

#: The modes, default first.
CHANNEL_MODES = ("replicate", "first", "mean")
#: Where the stem kernel sits in an encoder state dict and in a full network state dict.
STEM_KEYS = ("patch_embed.weight", "encoder.patch_embed.weight")


class ChannelAdaptationError(ValueError):
    """A channel change the chosen mode cannot make; the message names the counts and the fix."""


@dataclass(frozen=True)
class ChannelAdaptation:
    """What :func:`adapt_stem` did, for the weights metadata and the training log.

    Attributes:
        mode: One of :data:`CHANNEL_MODES`, or ``"none"`` when the counts already matched.
        source_channels: Channels the stem was trained with.
        target_channels: Channels of the network the weights are for.
        description: One line for humans, e.g. ``"replicate 1->3: stem copied x3 and scaled by 1/3"``.
    """

    mode: str
    source_channels: int
    target_channels: int
    description: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def short(self) -> str:
        """``"replicate 1->3"``, or ``"none"``: short enough for the network's provenance tag."""
        return "none" if self.mode == "none" else f"{self.mode} {self.source_channels}->{self.target_channels}"


def adapt_stem_weight(weight: Tensor, target_channels: int, mode: str = "replicate") -> tuple[Tensor, ChannelAdaptation]:
    """Adapt a stem kernel ``(E, C0, k, k, k)`` to ``(E, target_channels, k, k, k)``.

    Args:
        weight: The source kernel.
        target_channels: Input channels of the target network (>= 1).
        mode: One of :data:`CHANNEL_MODES` (see the module docstring).

    Returns:
        ``(kernel, adaptation)``; the kernel is a new tensor of the source dtype unless the counts match.

    Raises:
        ChannelAdaptationError: unknown mode, bad counts, or a change the mode cannot make.
    """
    if mode not in CHANNEL_MODES:
        raise ChannelAdaptationError(f"unknown channel mode {mode!r}; choose one of {', '.join(CHANNEL_MODES)}")
    if weight.ndim != 5:
        raise ChannelAdaptationError(f"expected a 3D convolution kernel (E, C, k, k, k), got shape {tuple(weight.shape)}")
    if target_channels < 1:
        raise ChannelAdaptationError(f"target channels must be >= 1, got {target_channels}")
    source = int(weight.shape[1])
    if source == target_channels:
        return weight, ChannelAdaptation("none", source, target_channels, f"none ({source} channel(s) on both sides)")
    change = f"{mode} {source}->{target_channels}"
    if mode == "first":
        adapted = weight.new_zeros((weight.shape[0], target_channels, *weight.shape[2:]))
        adapted[:, 0] = weight[:, 0]
        dropped = f"; source channels 1..{source - 1} dropped" if source > 1 else ""
        text = f"{change}: source channel 0 into target channel 0, other target channels zero{dropped}"
        return adapted, ChannelAdaptation(mode, source, target_channels, text)
    if mode == "replicate" and source != 1:
        raise ChannelAdaptationError(
            f"cannot replicate a {source}-channel stem to {target_channels} channels: replicate needs a 1-channel "
            f"source; use --channels mean (many to fewer) or --channels first"
        )
    if mode == "mean" and target_channels > source:
        raise ChannelAdaptationError(
            f"--channels mean maps many channels to fewer, but the stem has {source} and the target "
            f"{target_channels}; use --channels replicate (from 1 channel) or --channels first"
        )
    summed = weight.sum(dim=1, keepdim=True)
    adapted = (summed / target_channels).repeat(1, target_channels, 1, 1, 1)
    if mode == "replicate":
        text = f"{change}: stem copied x{target_channels} and scaled by 1/{target_channels}"
    else:
        text = f"{change}: the {source} source kernels summed and divided by {target_channels} for every target channel"
    return adapted, ChannelAdaptation(mode, source, target_channels, text)


def adapt_stem(
    state: Mapping[str, Tensor], target_channels: int, mode: str = "replicate"
) -> tuple[dict[str, Tensor], ChannelAdaptation]:
    """Adapt the stem of an encoder or full-network state dict to ``target_channels`` input channels.

    Args:
        state: ``SwinEncoder.state_dict()`` (key ``patch_embed.weight``) or ``SwinUNETRSeg.state_dict()``
            (key ``encoder.patch_embed.weight``). Not modified.
        target_channels: Input channels of the target network.
        mode: ``"replicate"``, ``"first"`` or ``"mean"`` (see the module docstring).

    Returns:
        ``(new_state, adaptation)``: a shallow copy with the stem kernel replaced, and what was done.

    Raises:
        ChannelAdaptationError: no stem key in ``state``, or a change the mode cannot make.
    """
    keys = [key for key in STEM_KEYS if key in state]
    if not keys:
        raise ChannelAdaptationError(
            f"the state dict has no stem kernel ({' or '.join(repr(k) for k in STEM_KEYS)}); is it a Swin encoder or "
            "SwinUNETRSeg state dict?"
        )
    new_state = dict(state)
    adaptation = None
    for key in keys:
        new_state[key], adaptation = adapt_stem_weight(state[key], target_channels, mode)
    assert adaptation is not None
    return new_state, adaptation
