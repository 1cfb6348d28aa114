"""Frozen CLIP through open_clip, with the hooks text-prompt methods need.

Weights, in order of precedence: a zoo entry (``zoo: clip-tiny``, built offline on the
synthetic world), a local checkpoint file (``checkpoint: path``; open_clip or OpenAI
state-dict keys, loaded weights-only), or an open_clip model name with a pretrained tag
(``model: ViT-B-32, pretrained: laion2b_s34b_b79k``: downloads, for users online).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prompttune.backbones.base import FrozenBackbone
from prompttune.backbones import zoo
from prompttune.registry import BACKBONES
from prompttune.utils import torch_load_trusted


@BACKBONES.register("clip")
class CLIPBackbone(FrozenBackbone):
    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = None, checkpoint: str | None = None,
                 zoo_entry: str | None = None, weights: str = "pretrained", **_: Any):
        super().__init__()
        import open_clip

        if zoo_entry:
            self.model = zoo.load_model(zoo_entry, weights)
            self.name = f"zoo:{zoo_entry}" + ("" if weights == "pretrained" else f"({weights})")
            ctx = self.model.context_length
            self._tokenizer = open_clip.SimpleTokenizer(context_length=ctx)
        else:
            register_tiny_config()
            if checkpoint:
                self.model = open_clip.create_model(model, pretrained=None)
                state = torch_load_trusted(checkpoint)
                state = state.get("state_dict", state) if isinstance(state, dict) else state
                state = {k.removeprefix("module."): v for k, v in state.items()}
                self.model.load_state_dict(state, strict=True)
                self.name = f"{model}:{Path(checkpoint).name}"
            else:
                tag = None if weights == "random" else pretrained
                self.model = open_clip.create_model(model, pretrained=tag)
                self.name = f"{model}:{tag or 'random'}"
            self._tokenizer = open_clip.get_tokenizer(model)
        visual = self.model.visual
        size = getattr(visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(getattr(visual, "image_mean", None) or self.mean)
        self.std = tuple(getattr(visual, "image_std", None) or self.std)
        self.freeze()

    # -- text side ---------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(texts).to(self.device)

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(tokens)

    @property
    def text_width(self) -> int:
        return self.model.token_embedding.weight.shape[1]

    @property
    def embed_dim(self) -> int:
        proj = self.model.text_projection
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    def encode_text_embeddings(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's ``encode_text`` from token embeddings [N, L, W]: what CoOp needs.

        ``tokens`` [N, L] only locates the end-of-text token (the pooled position), so
        prompts whose context replaces placeholder tokens keep the real EOT position.
        """
        m = self.model
        cast = m.transformer.get_cast_dtype()
        x = x.to(cast) + m.positional_embedding.to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        proj = m.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    # -- image side --------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()


# ------------------------------------------------------------------ zoo: clip-tiny
TINY_CLIP = dict(
    embed_dim=128,
    vision_cfg=dict(image_size=32, patch_size=8, width=128, layers=4, head_width=32, mlp_ratio=4.0),
    text_cfg=dict(context_length=24, vocab_size=49408, width=128, heads=4, layers=3),
)


TINY_NAME = "prompttune-clip-tiny"


def register_tiny_config() -> None:
    """Make the zoo architecture an open_clip model name, so a tiny checkpoint saved in open_clip's
    format loads exactly as a real one does (``model: prompttune-clip-tiny, checkpoint: file``)."""
    import json
    import tempfile

    import open_clip

    if TINY_NAME in open_clip.list_models():
        return
    folder = Path(tempfile.mkdtemp(prefix="prompttune-openclip-cfg-"))
    (folder / f"{TINY_NAME}.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)


def make_tiny_clip() -> nn.Module:
    import open_clip

    return open_clip.CLIP(**TINY_CLIP)


def pretrain_clip(model: nn.Module, folder: Path, n: int = 8000, epochs: int = 12, batch_size: int = 128,
                  lr: float = 2e-3, seed: int = 0, p_subcategory: float = 0.8) -> dict[str, Any]:
    """Contrastive (InfoNCE both ways) pretraining on synthetic-world image-caption pairs."""
    import open_clip
    from tqdm.auto import tqdm

    from prompttune.config import cache_dir
    from prompttune.data.base import ImageTransform, read_image
    from prompttune.data.captions import read_caption_csv
    from prompttune.data.image_folder import ensure_synthetic

    root = cache_dir() / "data" / f"world-captions-{n}-s{seed}"
    ensure_synthetic({"kind": "captions", "n": n, "side": 32, "seed": seed, "p_subcategory": p_subcategory}, root)
    rows = read_caption_csv(root / "captions.csv")
    tf = ImageTransform(32, CLIPBackbone.mean, CLIPBackbone.std)
    images = torch.stack([tf(read_image(p)) for p, _ in rows])
    tok = open_clip.SimpleTokenizer(context_length=model.context_length)
    texts = tok([c for _, c in rows])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    steps = epochs * math.ceil(len(rows) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    bar = tqdm(total=steps, desc=f"zoo {Path(folder).parent.name}: contrastive pretraining", unit="step")
    loss_v = float("nan")
    for _ in range(epochs):
        perm = torch.randperm(len(rows), generator=g)
        for i in range(0, len(rows), batch_size):
            idx = perm[i:i + batch_size]
            img_f = F.normalize(model.encode_image(images[idx]), dim=-1)
            txt_f = F.normalize(model.encode_text(texts[idx]), dim=-1)
            logits = model.logit_scale.exp() * img_f @ txt_f.T
            target = torch.arange(len(idx))
            # duplicate captions are frequent in a small world: treat identical texts as positives
            same = (texts[idx][:, None, :] == texts[idx][None, :, :]).all(-1).float()
            soft = same / same.sum(1, keepdim=True)
            loss = 0.5 * (torch.sum(-soft * logits.log_softmax(1), 1).mean()
                          + torch.sum(-soft * logits.T.log_softmax(1), 1).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            loss_v = float(loss.detach())
            bar.set_postfix(loss=f"{loss_v:.3f}")
            bar.update()
            del target
    bar.close()
    model.eval()
    return {"pairs": len(rows), "epochs": epochs, "final_loss": round(loss_v, 4)}


zoo.register(zoo.ZooEntry(
    name="clip-tiny", backbone="clip",
    description="open_clip CLIP (ViT 4x128, 32px, patch 8; text 3x128), contrastive on synthetic-world captions",
    make_model=make_tiny_clip, pretrain=pretrain_clip, version="2",
))
