"""Channel adaptation of the stem: replicate, first and mean, checked on features and hand-made kernels."""
from __future__ import annotations

import pytest
import torch

from nnunet_ssl.networks import PRESETS, SwinEncoder, SwinUNETRSeg
from nnunet_ssl.weights import build_weights_file
from nnunet_ssl.weights.channels import ChannelAdaptationError, adapt_stem, adapt_stem_weight


@pytest.fixture(scope="module")
def encoder() -> SwinEncoder:
    torch.manual_seed(7)
    return SwinEncoder(PRESETS["tiny"], in_channels=1).eval()


def _encoder_with(state: dict, channels: int) -> SwinEncoder:
    net = SwinEncoder(PRESETS["tiny"], in_channels=channels).eval()
    net.load_state_dict(state)
    return net


@pytest.mark.parametrize("channels", [2, 4])
def test_replicate_gives_the_one_channel_features_for_copies_of_an_image(encoder: SwinEncoder, channels: int) -> None:
    state, report = adapt_stem(encoder.state_dict(), channels, "replicate")
    assert (report.mode, report.source_channels, report.target_channels) == ("replicate", 1, channels)
    assert report.short == f"replicate 1->{channels}"
    multi = _encoder_with(state, channels)
    x = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        single_features = encoder(x)
        multi_features = multi(x.repeat(1, channels, 1, 1, 1))
    for a, b in zip(single_features, multi_features, strict=True):  # first stage (embedding) and every later stage
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_first_uses_channel_zero_only(encoder: SwinEncoder) -> None:
    state, report = adapt_stem(encoder.state_dict(), 3, "first")
    assert report.mode == "first"
    stem = state["patch_embed.weight"]
    assert torch.equal(stem[:, 0], encoder.state_dict()["patch_embed.weight"][:, 0])
    assert torch.count_nonzero(stem[:, 1:]) == 0
    multi = _encoder_with(state, 3)
    x = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(2))
    others = torch.randn(1, 2, 64, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(multi(torch.cat([x, others], 1))[0], encoder(x)[0], rtol=1e-4, atol=1e-5)


def test_hand_checked_kernels() -> None:
    # E=1, a 1x1x1 kernel per channel: the numbers can be checked by eye
    one = torch.tensor([6.0]).reshape(1, 1, 1, 1, 1)
    replicated, _ = adapt_stem_weight(one, 3, "replicate")
    assert replicated.flatten().tolist() == [2.0, 2.0, 2.0]
    first, _ = adapt_stem_weight(one, 3, "first")
    assert first.flatten().tolist() == [6.0, 0.0, 0.0]
    three = torch.tensor([1.0, 2.0, 6.0]).reshape(1, 3, 1, 1, 1)
    mean_to_one, report = adapt_stem_weight(three, 1, "mean")  # many to one: sum / 1
    assert mean_to_one.flatten().tolist() == [9.0] and report.description.startswith("mean 3->1")
    mean_to_two, _ = adapt_stem_weight(three, 2, "mean")  # sum / 2 in each target channel
    assert mean_to_two.flatten().tolist() == [4.5, 4.5]
    first_of_three, report = adapt_stem_weight(three, 1, "first")
    assert first_of_three.flatten().tolist() == [1.0] and "dropped" in report.description
    same, report = adapt_stem_weight(three, 3, "mean")
    assert same is three and report.mode == "none"


def test_many_to_one_and_back(encoder: SwinEncoder) -> None:
    """replicate 1->3 then mean 3->1 returns the original kernel; a mean-adapted 1-channel encoder sees x as
    the 3-channel encoder sees x in every channel."""
    original = encoder.state_dict()
    three, _ = adapt_stem(original, 3, "replicate")
    back, report = adapt_stem(three, 1, "mean")
    assert report.short == "mean 3->1"
    torch.testing.assert_close(back["patch_embed.weight"], original["patch_embed.weight"], rtol=1e-6, atol=1e-7)
    torch.manual_seed(11)
    multi = SwinEncoder(PRESETS["tiny"], in_channels=3).eval()  # a genuinely 3-channel encoder
    single_state, _ = adapt_stem(multi.state_dict(), 1, "mean")
    single = _encoder_with(single_state, 1)
    x = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(single(x)[0], multi(x.repeat(1, 3, 1, 1, 1))[0], rtol=1e-4, atol=1e-5)


def test_full_network_state_and_weights_file_record_the_mode(encoder: SwinEncoder) -> None:
    network_state = SwinUNETRSeg(PRESETS["tiny"], 1, 2).state_dict()
    adapted, _ = adapt_stem(network_state, 2, "first")
    assert adapted["encoder.patch_embed.weight"].shape[1] == 2
    assert network_state["encoder.patch_embed.weight"].shape[1] == 1  # input untouched
    payload = build_weights_file(encoder.state_dict(), "tiny", 2, 3, method="smit", channels="first")
    meta = payload["metadata"]
    assert meta["channel_mode"] == "first" and meta["source_in_channels"] == 1 and meta["in_channels"] == 2
    net = SwinUNETRSeg(PRESETS["tiny"], 2, 3)
    net.load_state_dict(payload["network_weights"])
    assert net.provenance()["channels"] == "first 1->2"  # what the trainer logs at load


def test_bad_requests_are_refused_with_the_fix(encoder: SwinEncoder) -> None:
    two = torch.zeros(4, 2, 2, 2, 2)
    with pytest.raises(ChannelAdaptationError, match="use --channels mean"):
        adapt_stem_weight(two, 3, "replicate")
    with pytest.raises(ChannelAdaptationError, match="many channels to fewer"):
        adapt_stem_weight(two, 3, "mean")
    with pytest.raises(ChannelAdaptationError, match="unknown channel mode 'avg'"):
        adapt_stem_weight(two, 1, "avg")
    with pytest.raises(ChannelAdaptationError, match="no stem kernel"):
        adapt_stem({"x": two}, 1)
