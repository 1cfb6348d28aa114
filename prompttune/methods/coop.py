"""CoOp: Context Optimization (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022).

Learnable context vectors replace the hand-written words of a CLIP prompt (Eq. 2-3 of the
paper): ``t_i = [V]_1 ... [V]_M [CLASS_i] .``, encoded by the frozen text encoder and
compared with the frozen image features by cosine similarity times CLIP's logit scale
(Eq. 1). As in the official code (KaiyangZhou/CoOp ``trainers/coop.py``, PromptLearner,
lines 60-182; defaults in ``train.py:90-95``):

* default (the paper's main setting, ``CTX_INIT=""``): M = ``n_ctx`` = 16 vectors ~ N(0, 0.02²)
  (``nn.init.normal_(std=0.02)``, coop.py:84-91), one per class with ``class_specific``;
* ``ctx_init`` ("a photo of a"): M = its number of *words* (coop.py:75) and the vectors are the
  token embeddings of its first M *tokens*; the prompt text is the phrase itself, so a phrase
  with more tokens than words keeps its leftover tokens in the fixed suffix (coop.py:79-80, 100,
  110). With ``class_specific`` the initialised context stays one shared [M, W] tensor (the
  official init branch ignores CSC). ``n_ctx`` must then equal the word count: a mismatch is a
  compose-time error (:meth:`CoOp.check_config`), because ``n_ctx`` would be silently inert;
* ``class_token_position``: "end", "middle" or "front" (coop.py:126-177);
* class names with ``_`` replaced by a space (coop.py:98); the start-of-text embedding and
  everything after the context are fixed buffers; the pooled position is the real
  end-of-text token of the tokenised prompt (TextEncoder, coop.py:55).

The official schedule (constant lr 1e-5 through epoch 0, then cosine stepped per epoch),
``drop_last`` and the paper's recipe live in the configs (``configs/method/coop.yaml``,
``configs/data/coop_*.yaml``, ``experiments/paper/coop_*.yaml``). Remaining departures, one
line each with the reason, are in ``docs/coop.md``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from prompttune.backbones.clip import CLIPBackbone
from prompttune.methods.base import Method
from prompttune.registry import METHODS

POSITIONS = ("end", "middle", "front")
log = logging.getLogger("prompttune")


def init_words(ctx_init: str | None) -> list[str]:
    """The words of an init phrase as the official code counts them (``_`` -> space, split on ' ')."""
    if not ctx_init:
        return []
    return ctx_init.replace("_", " ").split(" ")


class PromptLearner(nn.Module):
    """The learnable context and the fixed token pieces around it (shared by CoOp-style heads)."""

    def __init__(self, backbone: CLIPBackbone, texts: list[str], n_ctx: int = 16, ctx_init: str | None = None,
                 class_specific: bool = False, position: str = "end", init_std: float = 0.02):
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"class_token_position must be end, middle or front, not {position!r}")
        texts = [t.replace("_", " ") for t in texts]
        width = backbone.text_width
        device = backbone.device
        if ctx_init:
            ctx_init = ctx_init.replace("_", " ")
            n_ctx = len(init_words(ctx_init))
            with torch.no_grad():
                emb = backbone.token_embedding(backbone.tokenize([ctx_init]))
            # the first n_ctx *tokens*; shared even when class_specific (the official init branch)
            ctx = emb[0, 1:1 + n_ctx].float().clone()
            prefix_text = ctx_init  # leftover tokens of the phrase stay in the suffix
        else:
            if n_ctx < 1:
                raise ValueError("CoOp needs at least one context token (n_ctx >= 1)")
            shape = (len(texts), n_ctx, width) if class_specific else (n_ctx, width)
            ctx = nn.init.normal_(torch.empty(shape, device=device), std=init_std)
            prefix_text = " ".join(["X"] * n_ctx)
        self.ctx = nn.Parameter(ctx)
        self.n_ctx, self.position = n_ctx, position
        self.name_lens = [len(backbone.tokenize([t])[0].nonzero()) - 2 for t in texts]
        prompts = [f"{prefix_text} {t}." for t in texts]
        tokens = backbone.tokenize(prompts)
        with torch.no_grad():
            emb = backbone.token_embedding(tokens).float()
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)  # SOS
        self.register_buffer("suffix", emb[:, 1 + n_ctx:].clone(), persistent=False)  # [leftover] CLASS . EOS pad

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

    def __init__(self, n_ctx: int = 16, ctx_init: str | None = None, class_specific: bool = False,
                 class_token_position: str = "end", init_std: float = 0.02):
        super().__init__()
        self.cfg = dict(n_ctx=n_ctx, ctx_init=ctx_init or None, class_specific=class_specific,
                        position=class_token_position, init_std=init_std)
        self.prompt_learner: PromptLearner | None = None

    @classmethod
    def check_config(cls, cfg) -> None:
        from prompttune.config import ConfigError

        m = cfg.method
        pos = m.get("class_token_position", "end")
        if pos not in POSITIONS:
            raise ConfigError(f"method.class_token_position={pos!r}: expected one of {', '.join(POSITIONS)}")
        n_ctx, ctx_init = m.get("n_ctx", 16), m.get("ctx_init")
        if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < 1:
            raise ConfigError(f"method.n_ctx={n_ctx!r}: expected a whole number >= 1")
        std = m.get("init_std", 0.02)
        if not isinstance(std, (int, float)) or std <= 0:
            raise ConfigError(f"method.init_std={std!r}: expected a number > 0")
        words = init_words(ctx_init)
        if ctx_init is not None and (not str(ctx_init).strip() or "" in words):
            raise ConfigError(f"method.ctx_init={ctx_init!r}: expected words separated by single spaces, "
                              "or null for random context vectors")
        if words and n_ctx != len(words):
            raise ConfigError(
                f"method.n_ctx={n_ctx} is inert with method.ctx_init={ctx_init!r}: the init phrase sets the "
                f"number of context vectors to its {len(words)} words (official CoOp). Set method.n_ctx={len(words)}, "
                "or method.ctx_init=null for n_ctx random vectors")
        if words and m.get("class_specific", False):
            log.warning("method.class_specific=true with method.ctx_init=%r: the official CoOp initialises ONE "
                        "context shared by all classes from the phrase, so class_specific has no effect here; "
                        "set ctx_init=null for class-specific contexts", ctx_init)
        optim = m.get("optim", {})
        wtype = optim.get("warmup_type", "linear")
        if wtype not in ("linear", "constant"):
            raise ConfigError(f"method.optim.warmup_type={wtype!r}: expected linear (per step) or constant "
                              "(Dassl's ConstantWarmupScheduler, per epoch)")
        wlr = optim.get("warmup_lr", 1e-5)
        if not isinstance(wlr, (int, float)) or isinstance(wlr, bool) or wlr <= 0:
            raise ConfigError(f"method.optim.warmup_lr={wlr!r}: expected a number > 0")

    def setup(self, backbone, datamodule):
        self.prompt_learner = PromptLearner(backbone, datamodule.info()["classnames"], **self.cfg)

    def text_features(self, backbone) -> torch.Tensor:
        pl = self.prompt_learner
        return backbone.encode_text_embeddings(pl(), pl.token_positions())

    def forward(self, backbone, batch):
        img = F.normalize(batch["features"], dim=-1)
        text = F.normalize(self.text_features(backbone).float(), dim=-1)
        return {"logits": backbone.logit_scale.float() * img @ text.T}
