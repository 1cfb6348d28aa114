"""The CLIP backbone loads real-format checkpoints (open_clip state dicts), weights-only."""

import pickle

import pytest
import torch

from prompttune.backbones.clip import TINY_NAME, CLIPBackbone, make_tiny_clip


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
