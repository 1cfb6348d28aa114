"""vit-clip-tiny: clip-tiny's image tower as a timm ViT (the competent-ViT control for VPT vs SPT)."""

import pytest
import torch

from prompttune import zoo
from prompttune.zoo import vit_clip_tiny as V
from prompttune.zoo.clip_tiny import make_tiny_clip


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    clip = make_tiny_clip().eval()
    with torch.no_grad():  # move every weight off its init so a swapped or skipped tensor shows
        for p in clip.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vit = V.make_vit_clip().eval()
    vit.load_state_dict(V.clip_visual_to_timm(clip.visual), strict=True)
    return clip, vit


def test_converted_vit_reproduces_clips_pooled_feature(pair):
    clip, vit = pair
    x = torch.randn(6, 3, 32, 32)
    ref = V.pooled_pre_projection(clip.visual, x)
    with torch.no_grad():
        out = vit(x)
    assert out.shape == ref.shape == (6, 128)
    assert (out - ref).abs().max() < 1e-5
    # the projection is restored and still applies
    assert clip.visual.proj is not None
    assert clip.visual(x).shape == (6, 128)


def test_converted_vit_matches_clip_block_by_block_through_the_backbone_hooks(pair):
    """What VPT/SPT read (the tokens entering each block, the pooled feature) is clip's own."""
    from prompttune.backbones.vit import ViTBackbone

    clip, vit = pair
    bb = ViTBackbone.__new__(ViTBackbone)
    torch.nn.Module.__init__(bb)
    bb.model = vit
    x = torch.randn(3, 3, 32, 32)
    v = clip.visual
    with torch.no_grad():
        t = v.conv1(x).flatten(2).transpose(1, 2)
        t = torch.cat([v.class_embedding.expand(3, 1, -1), t], 1) + v.positional_embedding
        t = v.ln_pre(t)
        assert (bb.embed_tokens(x) - t).abs().max() < 1e-5
        ours = bb.layer_tokens(x, range(1, 5))
        for i, blk in enumerate(v.transformer.resblocks):
            t = blk(t)
            assert (ours[i + 1] - t[:, 1:]).abs().max() < 1e-4, f"block {i}"
        assert (bb.pool_tokens(vit.blocks(bb.embed_tokens(x))) - v.ln_post(t[:, 0])).abs().max() < 1e-4


def test_conversion_maps_every_weight_once(pair):
    clip, vit = pair
    state = V.clip_visual_to_timm(clip.visual)
    assert set(state) == set(vit.state_dict())
    n_clip = sum(p.numel() for k, p in clip.visual.state_dict().items() if k != "proj")
    assert sum(p.numel() for p in state.values()) == n_clip


def test_entry_is_built_from_clip_tiny_and_must_reproduce_it():
    e = zoo.get("vit-clip-tiny")
    assert e.backbone == "vit" and e.needs == ("clip-tiny",)
    assert {b.key for b in e.bars} == {"parity_max_abs", "linear_probe_acc"}
    parity = next(b for b in e.bars if b.key == "parity_max_abs")
    assert parity.check({"parity_max_abs": 1e-3}) and not parity.check({"parity_max_abs": 1e-6})
