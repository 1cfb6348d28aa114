"""CoOp: Context Optimization (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022).

Learnable context vectors replace the hand-written words of a CLIP prompt (Eq. 2-3 of the
paper): ``t_i = [V]_1 ... [V]_M [CLASS_i] .``, encoded by the frozen text encoder and
compared with the frozen image features by cosine similarity times CLIP's logit scale
(Eq. 1). As in the official code (KaiyangZhou/CoOp, ``trainers/coop.py``):

* ``ctx_init`` ("a photo of a") initialises the M = len(words) context vectors from the
  token embeddings of those words; otherwise M = ``n_ctx`` vectors ~ N(0, 0.02²);
* ``class_specific`` (CSC) learns one context per class, else one shared ("unified") context;
* ``class_token_position``: "end", "middle" or "front";
* the start-of-text embedding and the class name + "." + end-of-text embeddings are fixed
  buffers; the pooled position is the real end-of-text token of the tokenised prompt.

Departures: the official trainer warms up with a constant 1e-5 learning rate for one
epoch; here warm-up is the shared linear one (``optim.warmup_epochs``). Image features
come from the module's frozen-feature cache (the official trainer re-encodes every
image each epoch, with augmentation; with ``data.augment=true`` the cache is off and the
behaviour matches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prompttune.backbones.clip import CLIPBackbone
from prompttune.methods.base import Method
from prompttune.registry import METHODS


class PromptLearner(nn.Module):
    """The learnable context and the fixed token pieces around it (shared by CoOp-style heads)."""

    def __init__(self, backbone: CLIPBackbone, texts: list[str], n_ctx: int = 16, ctx_init: str | None = None,
                 class_specific: bool = False, position: str = "end", init_std: float = 0.02):
        super().__init__()
        if position not in ("end", "middle", "front"):
            raise ValueError(f"class_token_position must be end, middle or front, not {position!r}")
        texts = [t.replace("_", " ") for t in texts]
        width = backbone.text_width
        device = backbone.device
        with torch.no_grad():
            if ctx_init:
                ctx_init = ctx_init.replace("_", " ").strip()
                n_ctx = len(ctx_init.split(" "))
                emb = backbone.token_embedding(backbone.tokenize([ctx_init]))
                ctx = emb[0, 1:1 + n_ctx].float().clone()
                if class_specific:
                    ctx = ctx.unsqueeze(0).repeat(len(texts), 1, 1)
            else:
                shape = (len(texts), n_ctx, width) if class_specific else (n_ctx, width)
                ctx = torch.randn(shape, device=device) * init_std
        if n_ctx < 1:
            raise ValueError("CoOp needs at least one context token (n_ctx >= 1)")
        self.ctx = nn.Parameter(ctx)
        self.n_ctx, self.position = n_ctx, position
        placeholder = " ".join(["X"] * n_ctx)
        self.name_lens = [len(backbone.tokenize([t])[0].nonzero()) - 2 for t in texts]
        prompts = [f"{placeholder} {t}." for t in texts]
        tokens = backbone.tokenize(prompts)
        with torch.no_grad():
            emb = backbone.token_embedding(tokens).float()
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)  # SOS
        self.register_buffer("suffix", emb[:, 1 + n_ctx:].clone(), persistent=False)  # CLASS . EOS pad

    def forward(self) -> torch.Tensor:
        ctx = self.ctx
        n = self.prefix.shape[0]
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(n, -1, -1)
        if self.position == "end":
            return torch.cat([self.prefix, ctx, self.suffix], dim=1)
        out = []
        half = self.n_ctx // 2
        for i in range(n):
            name_len = self.name_lens[i]
            cls_tok = self.suffix[i:i + 1, :name_len]
            rest = self.suffix[i:i + 1, name_len:]
            c = ctx[i:i + 1]
            if self.position == "middle":
                out.append(torch.cat([self.prefix[i:i + 1], c[:, :half], cls_tok, c[:, half:], rest], dim=1))
            else:  # front
                out.append(torch.cat([self.prefix[i:i + 1], cls_tok, c, rest], dim=1))
        return torch.cat(out, dim=0)

    def token_positions(self) -> torch.Tensor:
        """Tokens whose argmax marks the end-of-text position (unchanged by reordering)."""
        return self.tokens


@METHODS.register("coop")
class CoOp(Method):
    task = "classification"
    backbone_kind = CLIPBackbone
    consumes = "image_features"

    def __init__(self, n_ctx: int = 16, ctx_init: str | None = "a photo of a", class_specific: bool = False,
                 class_token_position: str = "end"):
        super().__init__()
        self.cfg = dict(n_ctx=n_ctx, ctx_init=ctx_init or None, class_specific=class_specific,
                        position=class_token_position)
        self.prompt_learner: PromptLearner | None = None

    def setup(self, backbone, datamodule):
        self.prompt_learner = PromptLearner(backbone, datamodule.info()["classnames"], **self.cfg)

    def text_features(self, backbone) -> torch.Tensor:
        pl = self.prompt_learner
        return backbone.encode_text_embeddings(pl(), pl.token_positions())

    def forward(self, backbone, batch):
        img = F.normalize(batch["features"], dim=-1)
        text = F.normalize(self.text_features(backbone).float(), dim=-1)
        return {"logits": backbone.logit_scale.float() * img @ text.T}
