"""Frozen BLIP-2 through transformers (``Blip2ForConditionalGeneration``; OPT or Flan-T5 LMs).

Weights, in order of precedence:

* ``zoo_entry: blip2-tiny``: the offline zoo model (tiny ViT, tiny Q-Former, 2-layer OPT),
  pretrained by prompttune on synthetic-world captions and questions (built on first use);
* ``model: PATH_OR_ID``: a folder written by ``save_pretrained`` (model + tokenizer) or a
  hub id such as ``Salesforce/blip2-opt-2.7b`` / ``Salesforce/blip2-flan-t5-xl`` (downloads,
  for users online). ``weights: random`` builds the same architecture untrained.

BLIP-2 as released in transformers drops the Q-Former's text side (its word embeddings and
the text feed-forward of each layer), which MMICT's M-Hub needs (instruction text enters
the Q-Former with the queries, as in LAVIS / InstructBLIP). This wrapper therefore holds a
frozen ``qformer_text_embeddings`` (``Blip2TextEmbeddings``) next to the HF model: loaded from
``qformer_text_embeddings.safetensors`` in the model folder when present (the zoo and
:func:`save_blip2` write it), otherwise freshly initialised (N(0, 0.02)) with a warning --
the M-Hub trains it in its own copy either way. A Q-Former without the text feed-forward
(``use_qformer_text_input: false``, all released checkpoints) gets it from the query
feed-forward when a method copies the Q-Former (:func:`qformer_with_text_ffn`), which is how
LAVIS initialises InstructBLIP's text branch in reverse.

Image tokens (transformers >= 4.46/5.x): ``Blip2ForConditionalGeneration`` expects
``num_query_tokens`` copies of ``config.image_token_id`` in ``input_ids``, which it
overwrites with the projected query outputs. :meth:`Blip2Backbone.hf_prompt_ids` builds such
inputs (used to check our own prefix building against HF's forward); the methods themselves
compose ``inputs_embeds`` directly and call the language model, so they never depend on it.

Hooks (no method logic): :meth:`encode_images` (frozen ViT tokens, video frames
concatenated), :meth:`pooled_image_features`, :func:`run_qformer`, :meth:`lm_embed`,
:meth:`lm_loss`, :meth:`lm_generate`, tokenizers for the LM and the Q-Former text.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prompttune.backbones import zoo
from prompttune.backbones.base import FrozenBackbone
from prompttune.registry import BACKBONES

QFORMER_TEXT_FILE = "qformer_text_embeddings.safetensors"
EOC_TOKEN = "<|endofchunk|>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN, EOC_TOKEN)

# Words of the synthetic world's captions, questions and answers (data writers use only these).
PROMPT_WORDS = (
    "a an the of is are there what which how many color colour shape pattern size does have object "
    "objects photo picture image video frame describe question answer moves moving left right up down "
    "in with and it this that shown short caption : ? . , | 0 1 2 3 4 5 6"
).split()


def world_vocabulary() -> list[str]:
    from prompttune.data import world

    words: list[str] = []
    for group in (PROMPT_WORDS, world.CATEGORIES, world.SUBCATEGORIES, tuple(world.COLORS), world.SIZES,
                  world.NUMBER_WORDS, ("discs", "squares", "triangles", "crosses")):
        for w in group:
            if w not in words:
                words.append(w)
    return list(SPECIAL_TOKENS) + words


def make_world_tokenizer():
    """A word-level HF fast tokenizer over the synthetic world's vocabulary.

    Saves and loads with ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` like any
    hub tokenizer; unknown words map to ``<unk>``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(world_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=[IMAGE_TOKEN, EOC_TOKEN])
    fast.padding_side = "right"
    return fast


class Blip2WithQFormerText(nn.Module):
    """The zoo's unit of weights: the HF BLIP-2 model plus the Q-Former's text embeddings."""

    def __init__(self, model: nn.Module, qformer_text_embeddings: nn.Module):
        super().__init__()
        self.blip2 = model
        self.qformer_text_embeddings = qformer_text_embeddings


def tiny_blip2_config(vocab_size: int | None = None, lm: str = "opt", image_size: int = 32, patch_size: int = 8,
                      width: int = 64, num_query_tokens: int = 8):
    from transformers import Blip2Config, OPTConfig, T5Config

    tok = make_world_tokenizer()
    vocab_size = vocab_size or len(tok)
    vision = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=patch_size, initializer_range=0.02)
    qformer = dict(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=2 * width, max_position_embeddings=64, cross_attention_frequency=1,
                   encoder_hidden_size=width, use_qformer_text_input=True, pad_token_id=tok.pad_token_id,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if lm == "opt":
        text = OPTConfig(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
                         ffn_dim=4 * width, max_position_embeddings=256, word_embed_proj_dim=width,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         dropout=0.0, attention_dropout=0.0,
                         tie_word_embeddings=False).to_dict()  # the zoo stores safetensors: no shared tensors
    elif lm == "t5":
        text = T5Config(vocab_size=vocab_size, d_model=width, d_kv=16, d_ff=2 * width, num_layers=2,
                        num_decoder_layers=2, num_heads=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                        decoder_start_token_id=tok.pad_token_id, dropout_rate=0.0,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False).to_dict()
    else:
        raise ValueError(f"tiny BLIP-2 language model must be 'opt' or 't5', not {lm!r}")
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                       num_query_tokens=num_query_tokens, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN))


def make_tiny_blip2(lm: str = "opt") -> Blip2WithQFormerText:
    from transformers import Blip2ForConditionalGeneration
    from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

    cfg = tiny_blip2_config(lm=lm)
    model = Blip2ForConditionalGeneration(cfg)
    with torch.no_grad():  # HF zero-initialises the queries (all queries identical); LAVIS draws N(0, 0.02)
        model.query_tokens.normal_(std=0.02)
    text = Blip2TextEmbeddings(cfg.qformer_config)
    nn.init.normal_(text.word_embeddings.weight, std=0.02)
    nn.init.normal_(text.position_embeddings.weight, std=0.02)
    return Blip2WithQFormerText(model, text)


def save_blip2(unit: Blip2WithQFormerText, tokenizer, folder: str | Path) -> Path:
    """Write model + tokenizer in the HF format, and the Q-Former text embeddings beside them."""
    from safetensors.torch import save_file

    folder = Path(folder)
    unit.blip2.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in unit.qformer_text_embeddings.state_dict().items()}
    save_file(state, str(folder / QFORMER_TEXT_FILE))
    return folder


def qformer_with_text_ffn(qformer: nn.Module) -> nn.Module:
    """A trainable deep copy of a Q-Former whose layers all have the text feed-forward.

    Released BLIP-2 checkpoints lack it (``use_qformer_text_input=False``); it is then
    initialised from the query feed-forward of the same layer.
    """
    hub = copy.deepcopy(qformer)
    for layer in hub.encoder.layer:
        if not hasattr(layer, "intermediate"):
            layer.intermediate = copy.deepcopy(layer.intermediate_query)
            layer.output = copy.deepcopy(layer.output_query)
    hub.config.use_qformer_text_input = True
    hub.requires_grad_(True)
    return hub


def run_qformer(qformer: nn.Module, query_tokens: torch.Tensor, image_embeds: torch.Tensor,
                text_embeddings: nn.Module | None = None, text_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Q-Former over ``[queries; text]`` with cross-attention to ``image_embeds`` [B, N, Dv].

    Returns the last hidden states [B, Q + L, H]: positions ``:Q`` are the (text-guided)
    visual features, ``Q:`` the (visual-guided) textual features. Self-attention is joint
    over queries and text (LAVIS ``Qformer.bert(text_ids, query_embeds=...)``).
    """
    b = image_embeds.shape[0]
    q = query_tokens.expand(b, -1, -1)
    nq = q.shape[1]
    if text_ids is not None:
        emb = text_embeddings(input_ids=text_ids, query_embeds=q)
        mask = torch.cat([torch.ones(b, nq, dtype=torch.long, device=q.device), text_mask.long()], dim=1)
    else:
        emb, mask = q, None
    enc_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
    out = qformer(query_embeds=emb, query_length=nq, attention_mask=mask,
                  encoder_hidden_states=image_embeds, encoder_attention_mask=enc_mask, return_dict=True)
    return out.last_hidden_state


@BACKBONES.register("blip2")
class Blip2Backbone(FrozenBackbone):
    def __init__(self, model: str | None = None, zoo_entry: str | None = None, weights: str = "pretrained",
                 qformer_tokenizer: str | None = None, **_: Any):
        super().__init__()
        if weights not in ("pretrained", "random"):
            raise ValueError(f"backbone.weights must be 'pretrained' or 'random', not {weights!r}")
        if not zoo_entry and not model:
            raise ValueError("blip2 backbone needs `zoo_entry` (offline zoo) or `model` (HF id or save_pretrained folder)")
        import prompttune._tvshim  # noqa: F401  transformers imports torchvision
        from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

        if zoo_entry:
            unit = zoo.load_model(zoo_entry, weights)
            self.model, self.qformer_text_embeddings = unit.blip2, unit.qformer_text_embeddings
            self.tokenizer = make_world_tokenizer()
            self.name = f"zoo:{zoo_entry}" + ("" if weights == "pretrained" else "(random)")
        else:
            from transformers import AutoConfig, AutoTokenizer, Blip2ForConditionalGeneration

            folder = Path(model).expanduser()
            if folder.exists() and not (folder / "config.json").is_file():
                raise FileNotFoundError(f"{folder} is not a save_pretrained folder: no config.json in it")
            if weights == "random":
                self.model = Blip2ForConditionalGeneration(AutoConfig.from_pretrained(str(model)))
            else:
                self.model = Blip2ForConditionalGeneration.from_pretrained(str(model))
            self.tokenizer = AutoTokenizer.from_pretrained(str(model))
            self.qformer_text_embeddings = Blip2TextEmbeddings(self.model.config.qformer_config)
            text_file = folder / QFORMER_TEXT_FILE
            if folder.is_dir() and text_file.is_file() and weights == "pretrained":
                from safetensors.torch import load_file

                self.qformer_text_embeddings.load_state_dict(load_file(str(text_file)))
            else:
                nn.init.normal_(self.qformer_text_embeddings.word_embeddings.weight, std=0.02)
                nn.init.normal_(self.qformer_text_embeddings.position_embeddings.weight, std=0.02)
                if weights == "pretrained":
                    warnings.warn(f"{model}: no {QFORMER_TEXT_FILE}; the Q-Former text embeddings start random "
                                  "(methods that feed text to the Q-Former train them)", stacklevel=2)
            self.name = f"{model}" + ("" if weights == "pretrained" else "(random)")
        self.qformer_tokenizer = self.tokenizer
        if qformer_tokenizer:  # e.g. bert-base-uncased for released checkpoints (LAVIS uses it)
            from transformers import AutoTokenizer

            self.qformer_tokenizer = AutoTokenizer.from_pretrained(qformer_tokenizer)
        self._check_tokenizers()
        cfg = self.model.config
        self.image_size = int(cfg.vision_config.image_size)
        self.mean = (0.48145466, 0.4578275, 0.40821073)  # BLIP-2's processor (OpenAI CLIP statistics)
        self.std = (0.26862954, 0.26130258, 0.27577711)
        self.freeze()

    def _check_tokenizers(self) -> None:
        cfg = self.model.config
        if len(self.tokenizer) > cfg.text_config.vocab_size:
            raise ValueError(f"tokenizer has {len(self.tokenizer)} tokens but the language model only "
                             f"{cfg.text_config.vocab_size}")
        if len(self.qformer_tokenizer) > self.qformer_text_embeddings.word_embeddings.num_embeddings:
            raise ValueError(f"Q-Former tokenizer has {len(self.qformer_tokenizer)} tokens but the Q-Former text "
                             f"embeddings only {self.qformer_text_embeddings.word_embeddings.num_embeddings}")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    # ------------------------------------------------------------------ parts methods copy
    @property
    def qformer(self) -> nn.Module:
        return self.model.qformer

    @property
    def query_tokens(self) -> nn.Parameter:
        return self.model.query_tokens

    @property
    def language_projection(self) -> nn.Module:
        return self.model.language_projection

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    @property
    def num_query_tokens(self) -> int:
        return int(self.model.config.num_query_tokens)

    @property
    def is_encoder_decoder(self) -> bool:
        return not self.model.config.use_decoder_only_language_model

    @property
    def lm_width(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    # ------------------------------------------------------------------ vision
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen ViT tokens: [B,3,H,W] -> [B,N,Dv]; video [B,T,3,H,W] -> [B,T*N,Dv] (frames
        concatenated along the token axis, as MMICT feeds multi-image segments)."""
        if images.dim() == 5:
            b, t = images.shape[:2]
            feats = self.model.vision_model(pixel_values=images.flatten(0, 1), return_dict=True).last_hidden_state
            return feats.reshape(b, t * feats.shape[1], feats.shape[2])
        if images.dim() != 4:
            raise ValueError(f"images must be [B,3,H,W] or [B,T,3,H,W], got shape {tuple(images.shape)}")
        return self.model.vision_model(pixel_values=images, return_dict=True).last_hidden_state

    @torch.no_grad()
    def pooled_image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_images(images).mean(dim=1)

    encode_image = pooled_image_features  # the generic hook name (feature cache, similarity)

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: list[str], add_eos: bool = False, qformer: bool = False,
                 max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.qformer_tokenizer if qformer else self.tokenizer
        if add_eos:
            texts = [t + tok.eos_token for t in texts]
        enc = tok(list(texts), padding="longest", truncation=True, max_length=max_length,
                  add_special_tokens=False, return_tensors="pt")
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def lm_embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def token_id(self, token: str) -> int | None:
        i = self.tokenizer.convert_tokens_to_ids(token)
        return None if i is None or i == self.tokenizer.unk_token_id else int(i)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def hf_prompt_ids(self, prompts: list[str]) -> torch.Tensor:
        """HF-style ``input_ids``: ``num_query_tokens`` image tokens, BOS (decoder-only), prompt."""
        ids, _ = self.tokenize(prompts)
        n = ids.shape[0]
        img = torch.full((n, self.num_query_tokens), self.model.config.image_token_id, dtype=torch.long, device=ids.device)
        parts = [img]
        if not self.is_encoder_decoder:
            parts.append(torch.full((n, 1), self.tokenizer.bos_token_id, dtype=torch.long, device=ids.device))
        return torch.cat(parts + [ids], dim=1)

    # ------------------------------------------------------------------ language model
    def lm_loss(self, prefix: torch.Tensor, prefix_mask: torch.Tensor, target_ids: torch.Tensor,
                target_mask: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy of ``target_ids`` given the (left-padded) prefix embeddings."""
        labels = target_ids.masked_fill(target_mask == 0, -100)
        lm = self.language_model
        if self.is_encoder_decoder:
            return lm(inputs_embeds=prefix, attention_mask=prefix_mask, labels=labels,
                      decoder_attention_mask=target_mask, return_dict=True).loss
        embeds = torch.cat([prefix, self.lm_embed(target_ids).to(prefix.dtype)], dim=1)
        mask = torch.cat([prefix_mask, target_mask], dim=1)
        logits = lm(inputs_embeds=embeds, attention_mask=mask, return_dict=True).logits
        logits = logits[:, prefix.shape[1] - 1:-1]  # position t predicts token t+1
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def lm_generate(self, prefix: torch.Tensor, prefix_mask: torch.Tensor, max_new_tokens: int = 20,
                    num_beams: int = 1, min_new_tokens: int = 1) -> list[str]:
        tok = self.tokenizer
        out = self.language_model.generate(
            inputs_embeds=prefix, attention_mask=prefix_mask, max_new_tokens=int(max_new_tokens),
            min_new_tokens=int(min_new_tokens), num_beams=int(num_beams), do_sample=False,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
        )
        return self.decode(out)

    def bos_embedding(self) -> torch.Tensor | None:
        """[1, D] BOS embedding for decoder-only LMs (BLIP-2 OPT puts it after the image tokens)."""
        if self.is_encoder_decoder or self.tokenizer.bos_token_id is None:
            return None
        return self.lm_embed(torch.tensor([self.tokenizer.bos_token_id], device=self.device))


# ------------------------------------------------------------------ zoo: blip2-tiny
def _world_pairs(n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """(image path, instruction, target) triples from synthetic COCO captions + VQAv2 data."""
    from prompttune.config import cache_dir
    from prompttune.data.coco_captions import read_karpathy
    from prompttune.data.image_folder import ensure_synthetic
    from prompttune.data.vqav2 import read_vqav2, vqa_prompt

    cap_root = cache_dir() / "data" / f"world-coco-pretrain-{n}-s{seed}"
    ensure_synthetic({"kind": "coco_captions", "n_train": n, "n_val": 0, "n_test": 0, "seed": seed,
                      "style": "pretrain"}, cap_root)
    vqa_root = cache_dir() / "data" / f"world-vqa-pretrain-{n}-s{seed}"
    ensure_synthetic({"kind": "vqav2", "n_train": n // 2, "n_val": 0, "n_test": 0, "seed": seed + 1,
                      "style": "pretrain"}, vqa_root)
    paths, prompts, targets = [], [], []
    for r in read_karpathy(cap_root / "dataset_coco.json", cap_root, "train"):
        for c in r["refs"]:
            paths.append(r["path"]); prompts.append("a photo of"); targets.append(c)
    for r in read_vqav2(vqa_root, "train", "{split}2014/COCO_{split}2014_{image_id:012d}.png"):
        paths.append(r["path"]); prompts.append(vqa_prompt(r["question"])); targets.append(r["answer"])
    return paths, prompts, targets


def pretrain_blip2(unit: Blip2WithQFormerText, folder: Path, n: int = 1500, steps: int = 600, batch_size: int = 32,
                   lr: float = 1e-3, seed: int = 0) -> dict[str, Any]:
    """Generative (stage-2 style) pretraining of every part on synthetic captions and VQA.

    The Q-Former sees the instruction with its queries (InstructBLIP-style), so its text
    path -- which the M-Hub reuses for demonstrations -- is trained too. No in-context
    demonstrations are seen here: learning to use them is the tuning methods' job.
    (lr 3e-3 collapses the Q-Former's cross-attention -- outputs stop depending on the
    image -- so 1e-3 with one-cycle.)
    """
    threads = torch.get_num_threads()
    try:
        # matrices this small gain nothing from intra-op threads, and lose much on a shared CPU
        torch.set_num_threads(1)
        return _pretrain(unit, folder, n, steps, batch_size, lr, seed)
    finally:
        torch.set_num_threads(threads)


def _pretrain(unit, folder, n, steps, batch_size, lr, seed):
    from tqdm.auto import tqdm

    from prompttune.data.base import ImageTransform, read_image

    torch.manual_seed(seed)
    paths, prompts, targets = _world_pairs(n, seed)
    model, text_emb = unit.blip2, unit.qformer_text_embeddings
    size = model.config.vision_config.image_size
    tf = ImageTransform(size, Blip2Backbone.mean, Blip2Backbone.std)
    uniq = sorted(set(paths))
    pix = torch.stack([tf(read_image(p)) for p in uniq])
    row = {p: i for i, p in enumerate(uniq)}
    img_idx = torch.tensor([row[p] for p in paths])
    tok = make_world_tokenizer()
    p_ids = tok(prompts, padding="longest", add_special_tokens=False, return_tensors="pt")
    t_ids = tok([t + tok.eos_token for t in targets], padding="longest", add_special_tokens=False, return_tensors="pt")
    params = list(model.parameters()) + list(text_emb.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    bos = torch.tensor([tok.bos_token_id])
    nq = model.config.num_query_tokens
    loss_v = float("nan")
    bar = tqdm(total=steps, desc="zoo blip2-tiny: generative pretraining", unit="step")
    for step in range(steps):
        idx = torch.randint(len(paths), (batch_size,), generator=g)
        img = model.vision_model(pixel_values=pix[img_idx[idx]], return_dict=True).last_hidden_state
        pi, pm = p_ids.input_ids[idx], p_ids.attention_mask[idx]
        keep = int(pm.sum(1).max())
        pi, pm = pi[:, :keep], pm[:, :keep]
        hidden = run_qformer(model.qformer, model.query_tokens, img, text_emb, pi, pm)[:, :nq]
        vis = model.language_projection(hidden)
        emb = model.get_input_embeddings()
        prefix = torch.cat([vis, emb(bos).expand(batch_size, 1, -1), emb(pi)], dim=1)
        pmask = torch.cat([torch.ones(batch_size, nq + 1, dtype=torch.long), pm], dim=1)
        ti, tm = t_ids.input_ids[idx], t_ids.attention_mask[idx]
        keep = int(tm.sum(1).max())
        ti, tm = ti[:, :keep], tm[:, :keep]
        embeds = torch.cat([prefix, emb(ti)], dim=1)
        mask = torch.cat([pmask, tm], dim=1)
        logits = model.language_model(inputs_embeds=embeds, attention_mask=mask, return_dict=True).logits
        logits = logits[:, prefix.shape[1] - 1:-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ti.masked_fill(tm == 0, -100).reshape(-1),
                               ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss_v = float(loss.detach())
        bar.set_postfix(loss=f"{loss_v:.3f}")
        bar.update()
    bar.close()
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder / "tokenizer")  # the HF format, for users who load the zoo folder elsewhere
    return {"pairs": len(paths), "steps": steps, "final_loss": round(loss_v, 4)}


zoo.register(zoo.ZooEntry(
    name="blip2-tiny", backbone="blip2",
    description="BLIP-2 (ViT 2x64 @32px/8, Q-Former 2x64 with 8 queries + text path, OPT 2x64), "
                "generative pretraining on synthetic-world captions and VQA",
    make_model=make_tiny_blip2, pretrain=pretrain_blip2, version="3",
))
