"""The CLIP backbone loads real-format checkpoints (open_clip state dicts), weights-only."""

import pickle

import pytest
import torch

from prompttune.backbones.clip import CLIPBackbone
from prompttune.zoo.clip_tiny import TINY_NAME, make_tiny_clip


def test_local_open_clip_checkpoint_loads_exactly(tmp_path):
    torch.manual_seed(1)
    src = make_tiny_clip()
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)  # DDP-saved form
    bb = CLIPBackbone(model=TINY_NAME, checkpoint=str(path))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_image(images), src.eval().encode_image(images))
    assert not any(p.requires_grad for p in bb.parameters()) and not bb.training
    assert bb.image_size == 32


def test_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    src = make_tiny_clip()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "c.safetensors"))
    bb = CLIPBackbone(model=TINY_NAME, checkpoint=str(tmp_path / "c.safetensors"))
    torch.testing.assert_close(bb.model.logit_scale, src.logit_scale)


def test_untrusted_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": Evil()}, fh)
    with pytest.raises(ValueError, match="could not load .*evil.pt as a weights-only checkpoint"):
        CLIPBackbone(model=TINY_NAME, checkpoint=str(path))


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.pt"):
        CLIPBackbone(model=TINY_NAME, checkpoint=str(tmp_path / "nope.pt"))


# ---------------------------------------------------------------------------- QuickGELU (issue 13 item 1)
def _activation_modules(model):
    from open_clip.transformer import QuickGELU

    return {type(m) for m in model.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))}


def test_activation_follows_the_weights_provenance():
    from prompttune.backbones.clip import wants_quick_gelu

    assert wants_quick_gelu("ViT-B-32", "openai") is True  # OpenAI trained with QuickGELU
    assert wants_quick_gelu("ViT-B-16", "openai") is True
    assert wants_quick_gelu("ViT-B-32", "laion2b_s34b_b79k") is False
    assert wants_quick_gelu("ViT-B-32-quickgelu", None) is True
    assert wants_quick_gelu("ViT-B-32", None) is False
    assert wants_quick_gelu(TINY_NAME, None, torchscript=True) is True  # OpenAI's released archive
    with pytest.raises(ValueError, match="quick_gelu=false, but open_clip model 'ViT-B-32-quickgelu'"):
        wants_quick_gelu("ViT-B-32-quickgelu", None, quick_gelu=False)


def test_shipped_openai_config_builds_quick_gelu_and_a_laion_tag_keeps_gelu():
    """The real ViT-B/32 config (random weights: no download) is built with QuickGELU; the same
    architecture under a laion tag keeps GELU."""
    from open_clip.transformer import QuickGELU

    from prompttune.config import compose
    from prompttune.runs import build_backbone

    cfg = compose(None, ["method=coop", "backbone=clip_vit_b32", "backbone.weights=random"])
    bb = build_backbone(cfg)
    assert _activation_modules(bb.model) == {QuickGELU} and bb.activation == "quick_gelu"
    assert bb.name.endswith("+quickgelu")
    laion = CLIPBackbone(model="ViT-B-32", pretrained="laion2b_s34b_b79k", weights="random")
    assert _activation_modules(laion.model) == {torch.nn.GELU} and laion.activation == "gelu"


def test_checkpoint_route_builds_the_activation_of_the_weights(tmp_path):
    """A state dict saved from a QuickGELU model reproduces it only when rebuilt with QuickGELU:
    ``quick_gelu: true`` (or an OpenAI provenance tag) on the checkpoint route does that."""
    import open_clip

    from prompttune.zoo.clip_tiny import TINY_CLIP

    torch.manual_seed(3)
    src = open_clip.CLIP(**TINY_CLIP, quick_gelu=True).eval()
    path = tmp_path / "qg.pt"
    torch.save(src.state_dict(), path)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = src.encode_image(images)
        good = CLIPBackbone(model=TINY_NAME, checkpoint=str(path), quick_gelu=True)
        bad = CLIPBackbone(model=TINY_NAME, checkpoint=str(path))  # no provenance: GELU
        torch.testing.assert_close(good.encode_image(images), ref)
        assert good.activation == "quick_gelu" and bad.activation == "gelu"
        assert (bad.encode_image(images) - ref).abs().max() > 1e-3  # the wrong activation shifts features


def test_openai_torchscript_archive_loads_with_quick_gelu(tmp_path):
    """OpenAI releases TorchScript archives; they load (no pickled code) and build QuickGELU."""
    import open_clip

    from prompttune.backbones.clip import is_torchscript_archive
    from prompttune.zoo.clip_tiny import TINY_CLIP

    torch.manual_seed(4)
    src = open_clip.CLIP(**TINY_CLIP, quick_gelu=True).eval()
    images = torch.randn(2, 3, 32, 32)
    traced = torch.jit.trace_module(src, {"encode_image": images}, check_trace=False)
    path = tmp_path / "ViT-tiny.pt"
    traced.save(str(path))
    assert is_torchscript_archive(path)
    bb = CLIPBackbone(model=TINY_NAME, checkpoint=str(path))
    assert bb.activation == "quick_gelu"
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_image(images), src.encode_image(images))
