"""Frozen BLIP-2 through transformers (``Blip2ForConditionalGeneration``; OPT or Flan-T5 LMs).

Weights, in order of precedence:

* ``zoo_entry: blip2-tiny``: the offline zoo model (tiny ViT, tiny Q-Former, 2-layer OPT),
  pretrained by prompttune on synthetic-world captions and questions (built on first use);
* ``model: PATH_OR_ID``: a folder written by ``save_pretrained`` (model + tokenizer) or a
  hub id such as ``Salesforce/blip2-opt-2.7b`` / ``Salesforce/blip2-flan-t5-xl`` (downloads,
  for users online). ``weights: random`` builds the same architecture untrained.

BLIP-2 as released in transformers drops the Q-Former's text side (its word and position
embeddings and the text feed-forward of each layer), which MMICT's M-Hub needs (instruction text
enters the Q-Former with the queries, as in LAVIS / InstructBLIP). Official MMICT/LAVIS take these
from the LAVIS checkpoint (``Qformer.bert.*``), itself started from bert-base-uncased. Here
(``qformer_text_source`` records which):

* the zoo and :func:`save_blip2` folders carry them (``qformer_text_embeddings.safetensors`` and a
  Q-Former saved with ``use_qformer_text_input``);
* ``qformer_text_from: PATH.pth`` loads them from a LAVIS BLIP-2 checkpoint (weights only);
  ``qformer_text_from: bert-base-uncased`` (or a BERT folder) from BERT through transformers;
* with released weights and neither, methods that feed text to the Q-Former raise a
  ``ConfigError`` naming both remedies, unless ``qformer_text_random: true`` asks for a random
  start (N(0, 0.02) embeddings; the text feed-forward copied from the query feed-forward,
  :func:`qformer_with_text_ffn`).

Preprocessing (the datamodules' ``SquashTransform``): the whole image is resized to
size x size, as LAVIS ``blip_image_eval`` and HF's ``BlipImageProcessor`` do -- no crop.
The Q-Former's text is tokenised with special tokens (``[CLS] ... [SEP]`` with
bert-base-uncased, LAVIS ``init_tokenizer``); Flan-T5 instructions end with ``</s>``
(:meth:`Blip2Backbone.prompt_ids`).

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

from prompttune import zoo
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


QFORMER_TEXT_REMEDY = ("set backbone.qformer_text_from to a LAVIS BLIP-2 checkpoint (.pth, whose Qformer.bert.* keys "
                       "hold them, e.g. blip2_pretrained_flant5xl.pth) or to bert-base-uncased (a transformers id or "
                       "folder; what LAVIS initialises them from); or set backbone.qformer_text_random=true to "
                       "start them at random knowingly")


def _load_torch_state(path: Path) -> dict[str, torch.Tensor]:
    """A LAVIS checkpoint: ``{"model": state_dict, ...}`` or a bare state dict; tensors only."""
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - name the file and the cause
        raise ValueError(f"backbone.qformer_text_from={str(path)!r}: cannot read it as a PyTorch checkpoint "
                         f"(weights only): {err}") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"backbone.qformer_text_from={str(path)!r}: expected a state dict (or {{'model': state dict}})")
    return state


def qformer_text_state_from_lavis(state: dict[str, torch.Tensor], num_layers: int, source: str = "checkpoint"
                                  ) -> dict[str, torch.Tensor]:
    """Map LAVIS ``Qformer.bert.*`` text-path keys to prompttune's names:
    ``embeddings.{word,position}_embeddings.weight`` and ``layer.{i}.{intermediate,output}.*``."""
    pre = "Qformer.bert."
    out: dict[str, torch.Tensor] = {}
    for name in ("word_embeddings", "position_embeddings"):
        key = f"{pre}embeddings.{name}.weight"
        if key not in state:
            raise ValueError(f"{source}: no {key!r}; a LAVIS BLIP-2 checkpoint holds the Q-Former text path under "
                             f"'Qformer.bert.*' (found e.g. {sorted(state)[:3]})")
        out[f"embeddings.{name}.weight"] = state[key]
    for i in range(num_layers):
        for part in ("intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight", "output.dense.bias",
                     "output.LayerNorm.weight", "output.LayerNorm.bias"):
            key = f"{pre}encoder.layer.{i}.{part}"
            if key not in state:
                raise ValueError(f"{source}: no {key!r} (the text feed-forward of Q-Former layer {i})")
            out[f"layer.{i}.{part}"] = state[key]
    return out


def qformer_text_state_from_bert(bert: nn.Module, num_layers: int) -> dict[str, torch.Tensor]:
    """The same parts from a transformers ``BertModel`` (LAVIS ``init_Qformer`` starts from bert-base-uncased)."""
    sd = bert.state_dict()
    if len(bert.encoder.layer) < num_layers:
        raise ValueError(f"the BERT model has {len(bert.encoder.layer)} layers; the Q-Former needs {num_layers}")
    out = {f"embeddings.{n}.weight": sd[f"embeddings.{n}.weight"] for n in ("word_embeddings", "position_embeddings")}
    for i in range(num_layers):
        for part in ("intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight", "output.dense.bias",
                     "output.LayerNorm.weight", "output.LayerNorm.bias"):
            out[f"layer.{i}.{part}"] = sd[f"encoder.layer.{i}.{part}"]
    return out


def install_qformer_text(model: nn.Module, text_embeddings: nn.Module, state: dict[str, torch.Tensor],
                         source: str) -> nn.Module:
    """Load the Q-Former text path into ``model.qformer`` (adding each layer's text feed-forward when
    the checkpoint was saved without it) and into a new ``Blip2TextEmbeddings`` sized as the source."""
    from transformers.models.blip_2.modeling_blip_2 import (Blip2QFormerIntermediate, Blip2QFormerOutput,
                                                            Blip2TextEmbeddings)

    qcfg = model.config.qformer_config
    word = state["embeddings.word_embeddings.weight"]
    pos = state["embeddings.position_embeddings.weight"]
    if word.shape[1] != qcfg.hidden_size or pos.shape[1] != qcfg.hidden_size:
        raise ValueError(f"{source}: text embeddings of width {word.shape[1]}, but the Q-Former is "
                         f"{qcfg.hidden_size} wide")
    tcfg = copy.deepcopy(qcfg)
    tcfg.vocab_size, tcfg.max_position_embeddings = int(word.shape[0]), int(pos.shape[0])
    text = Blip2TextEmbeddings(tcfg)
    text.word_embeddings.weight.data.copy_(word.float())
    text.position_embeddings.weight.data.copy_(pos.float())
    for i, layer in enumerate(model.qformer.encoder.layer):
        if not hasattr(layer, "intermediate"):
            layer.intermediate = Blip2QFormerIntermediate(qcfg)
            layer.output = Blip2QFormerOutput(qcfg)
        for part in ("intermediate", "output"):
            sub = {k[len(f"layer.{i}.{part}."):]: v.float() for k, v in state.items()
                   if k.startswith(f"layer.{i}.{part}.")}
            try:
                getattr(layer, part).load_state_dict(sub)
            except RuntimeError as err:
                raise ValueError(f"{source}: the text feed-forward of layer {i} does not fit the Q-Former: {err}") from None
    model.config.qformer_config.use_qformer_text_input = True
    model.qformer.config.use_qformer_text_input = True
    return text


@BACKBONES.register("blip2")
class Blip2Backbone(FrozenBackbone):
    """Frozen BLIP-2. ``qformer_text_source`` records where the Q-Former's text path came from:
    ``zoo``, ``folder`` (``qformer_text_embeddings.safetensors`` beside a save_pretrained model),
    ``lavis:PATH``, ``bert:ID``, ``random`` (asked for) or ``missing`` (released HF weights and
    no source given: methods that feed text to the Q-Former refuse to start)."""

    def __init__(self, model: str | None = None, zoo_entry: str | None = None, weights: str = "pretrained",
                 qformer_tokenizer: str | None = None, qformer_text_from: str | None = None,
                 qformer_text_random: bool = False, **_: Any):
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
            self.qformer_text_source = "zoo"
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
            if weights == "random":
                self._random_text()
                self.qformer_text_source = "random"
            elif qformer_text_from:
                self._load_text_from(str(qformer_text_from))
            elif folder.is_dir() and text_file.is_file():
                from safetensors.torch import load_file

                state = load_file(str(text_file))
                tcfg = copy.deepcopy(self.model.config.qformer_config)  # sized as saved (LAVIS adds [DEC])
                tcfg.vocab_size = int(state["word_embeddings.weight"].shape[0])
                tcfg.max_position_embeddings = int(state["position_embeddings.weight"].shape[0])
                self.qformer_text_embeddings = Blip2TextEmbeddings(tcfg)
                self.qformer_text_embeddings.load_state_dict(state)
                self.qformer_text_source = "folder"
            elif qformer_text_random:
                self._random_text()
                warnings.warn(f"{model}: the Q-Former text embeddings start random (backbone.qformer_text_random=true); "
                              "official MMICT/LAVIS take them from the LAVIS checkpoint / bert-base-uncased", stacklevel=2)
                self.qformer_text_source = "random"
            else:  # methods that need the text path raise (see require_qformer_text)
                self._random_text()
                self.qformer_text_source = "missing"
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

    def _random_text(self) -> None:
        nn.init.normal_(self.qformer_text_embeddings.word_embeddings.weight, std=0.02)
        nn.init.normal_(self.qformer_text_embeddings.position_embeddings.weight, std=0.02)

    def _load_text_from(self, source: str) -> None:
        n_layers = len(self.model.qformer.encoder.layer)
        path = Path(source).expanduser()
        if path.is_file():  # a LAVIS checkpoint
            state = _load_torch_state(path)
            if "query_tokens" in state and state["query_tokens"].shape == self.model.query_tokens.shape:
                if not torch.allclose(state["query_tokens"].float(), self.model.query_tokens.float(), atol=1e-2):
                    warnings.warn(f"{source}: its query tokens differ from the loaded BLIP-2's; the text path may come "
                                  "from a different checkpoint", stacklevel=3)
            parts = qformer_text_state_from_lavis(state, n_layers, source=f"backbone.qformer_text_from={source!r}")
            self.qformer_text_source = f"lavis:{path.name}"
        else:  # a BERT model: transformers id or save_pretrained folder
            from transformers import BertModel

            try:
                bert = BertModel.from_pretrained(source)
            except (OSError, ValueError) as err:
                raise ValueError(f"backbone.qformer_text_from={source!r} is neither a LAVIS checkpoint file nor a "
                                 f"BERT model transformers can load: {err}") from None
            parts = qformer_text_state_from_bert(bert, n_layers)
            self.qformer_text_source = f"bert:{source}"
        self.qformer_text_embeddings = install_qformer_text(self.model, self.qformer_text_embeddings, parts,
                                                            f"backbone.qformer_text_from={source!r}")

    def require_qformer_text(self, who: str) -> None:
        """Methods that feed text to the Q-Former call this: never a silent random start."""
        if self.qformer_text_source == "missing":
            from prompttune.config import ConfigError

            raise ConfigError(f"{who} feeds text to the Q-Former, but {self.name} has no Q-Former word/position "
                              f"embeddings or text feed-forward (released HF BLIP-2 checkpoints drop them): "
                              + QFORMER_TEXT_REMEDY)

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
    def encode_images(self, images: torch.Tensor, pre_ln: bool = False) -> torch.Tensor:
        """Frozen ViT tokens: [B,3,H,W] -> [B,N,Dv]; video [B,T,3,H,W] -> [B,T*N,Dv] (frames
        concatenated along the token axis, as MMICT feeds multi-image segments).

        ``pre_ln=True`` stops before the ViT's final LayerNorm (HF ``post_layernorm`` = LAVIS
        ``ln_vision``), for methods that train their own copy of it as official MMICT does."""
        if images.dim() == 5:
            b, t = images.shape[:2]
            feats = self._vit(images.flatten(0, 1), pre_ln)
            return feats.reshape(b, t * feats.shape[1], feats.shape[2])
        if images.dim() != 4:
            raise ValueError(f"images must be [B,3,H,W] or [B,T,3,H,W], got shape {tuple(images.shape)}")
        return self._vit(images, pre_ln)

    def _vit(self, pixels: torch.Tensor, pre_ln: bool) -> torch.Tensor:
        vm = self.model.vision_model
        if not pre_ln:
            return vm(pixel_values=pixels, return_dict=True).last_hidden_state
        return vm.encoder(inputs_embeds=vm.embeddings(pixels), return_dict=True).last_hidden_state

    @property
    def ln_vision(self) -> nn.Module:
        return self.model.vision_model.post_layernorm

    @torch.no_grad()
    def pooled_image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_images(images).mean(dim=1)

    encode_image = pooled_image_features  # the generic hook name (feature cache, similarity)

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: list[str], add_eos: bool = False, qformer: bool = False,
                 max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and mask. The Q-Former side adds the tokenizer's special tokens
        (``[CLS] text [SEP]`` with bert-base-uncased, as LAVIS tokenises the Q-Former's text);
        the LM side adds none (``add_eos`` appends EOS, for targets)."""
        tok = self.qformer_tokenizer if qformer else self.tokenizer
        if add_eos:
            texts = [t + tok.eos_token for t in texts]
        enc = tok(list(texts), padding="longest", truncation=True, max_length=max_length,
                  add_special_tokens=qformer, return_tensors="pt")
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def prompt_ids(self, prompts: list[str], max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """LM ids of instructions as BLIP-2's processor builds them: an encoder-decoder (Flan-T5)
        prompt ends with ``</s>`` (the T5 tokenizer's ``add_special_tokens``; MMICT
        ``blip2_t5.py`` tokenises with it); decoder-only prompts have none here (the BOS comes
        from :meth:`bos_embedding`, after the image tokens)."""
        ids, mask = self.tokenize(prompts, max_length=max_length)
        if not self.is_encoder_decoder:
            return ids, mask
        eos = self.tokenizer.eos_token_id
        lengths = mask.sum(1)
        out = ids.new_full((ids.shape[0], ids.shape[1] + 1), self.tokenizer.pad_token_id)
        out_mask = mask.new_zeros(out.shape)
        for i, n in enumerate(lengths.tolist()):
            row = ids[i, :n]
            if n == 0 or int(row[-1]) != eos:
                row = torch.cat([row, row.new_tensor([eos])])
            out[i, :len(row)] = row
            out_mask[i, :len(row)] = 1
        keep = int(out_mask.sum(1).max())
        return out[:, :keep], out_mask[:, :keep]

    def lm_embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def token_id(self, token: str) -> int | None:
        i = self.tokenizer.convert_tokens_to_ids(token)
        return None if i is None or i == self.tokenizer.unk_token_id else int(i)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def hf_prompt_ids(self, prompts: list[str]) -> torch.Tensor:
        """HF-style ``input_ids`` (what ``Blip2Processor`` gives): ``num_query_tokens`` image tokens,
        then BOS + prompt (decoder-only) or prompt + ``</s>`` (Flan-T5). One prompt length only."""
        ids, mask = self.prompt_ids(prompts)
        if not bool(mask.all()):
            raise ValueError("hf_prompt_ids needs prompts of one token length (HF would pad them)")
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
