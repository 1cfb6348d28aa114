"""Frozen timm Vision Transformer, with the hooks visual-prompt methods need.

Weights, in order of precedence:

* ``zoo_entry: vit-mae-tiny`` -- a small ViT pretrained MAE-style by prompttune on the
  synthetic world (offline; see :mod:`prompttune.zoo.vit_mae_tiny`);
* ``checkpoint: path`` -- a local file, loaded weights-only, in one of the formats users
  actually have (``checkpoint_format: auto`` detects it, see :func:`inspect_checkpoint`):

  - ``mae``: Meta's ``mae_pretrain_vit_base.pth`` (``{"model": encoder state}``);
  - ``moco``: MoCo-v3 (``{"state_dict": {"module.base_encoder.<timm key>": ...}}``; the
    momentum encoder, predictor and projection ``head`` are dropped);
  - ``timm``: a plain timm state dict (``.pth``/``.bin``/``.safetensors``; ``module.``
    prefixes stripped, classifier ``head`` dropped), e.g. a saved supervised
    ``vit_base_patch16_224.augreg_in21k``;
  - ``npz``: the original JAX ``.npz`` (e.g. ``ViT-B_16.npz`` of ImageNet-21k), through
    timm's own converter;

* ``model: <timm name>`` (``model_kwargs`` override its architecture arguments) with ``pretrained: <tag>`` (``augreg_in21k``, ``mae``, ...) or
  ``pretrained: true`` (the name's default tag): downloads, for users online.

**Provenance and pooling** (``pool: auto``). The pooling follows the pretraining, decided
from what the weights are, never from a wrapper alone (a ``{"model": ...}`` dict is how
MAE ships, but also how many training scripts save any ViT):

* MAE -- a checkpoint with MAE's decoder or ``mask_token``; or an encoder with no
  classifier head, no ``fc_norm`` and MAE's fixed 2-D sin-cos position embedding; or the
  hub tag ``mae``: mean of the tokens after CLS, then the encoder's final ``norm`` applied
  *after* the mean (it becomes timm's ``fc_norm``), as SPT's ``Models/MAE_vpt_deep.py``
  (``x[:, 1:].mean(1)`` then ``self.norm``) and MAE's fine-tuning code do;
* a checkpoint with ``fc_norm`` (an avg-pooling model, e.g. MAE fine-tuned): mean pooling;
* MoCo-v3 (``module.base_encoder.`` keys), supervised checkpoints (a classifier ``head`` or
  ``pre_logits``), JAX ``.npz``, every other hub tag, and a head-less timm dict whose
  position embedding is learned: the final ``norm`` then the CLS token.

``pool: cls | avg`` overrides it (the norm moves with the pooling, so no weight is lost).
The decision and its reason are on the backbone (``pool``, ``provenance``) and in every
run record (:meth:`ViTBackbone.record`).

**Normalisation: one rule.** Every ViT weight -- hub or file, in21k, MAE, MoCo -- gets the
ImageNet mean/std, as VPT (``src/data/transforms.py:8-10``) and SPT
(``Dataset/FGVC.py:51``, ``Dataset/VTAB.py:55``) normalise every backbone, whatever
timm's ``pretrained_cfg`` says (its in21k tags say 0.5/0.5). ``mean`` / ``std`` override
it; the zoo model keeps the statistics it was pretrained with.

**drop_path_rate** is stochastic depth on the frozen blocks *during training* only, as
SPT's training runs its frozen ViT in ``model.train()`` with ``drop_path_rate=args.drop_path``
(``train_MAE.py:237,449``): the backbone stays in eval mode except its ``DropPath`` layers,
which follow the training mode (:meth:`ViTBackbone.train`). Its published recipes pass
``--drop_path 0.0`` (SPT README), which is the default here.

Hooks (used by ``methods/_vit_prompts.py``; no method logic lives here):
``patch_tokens`` (SPT's layer 0), ``embed_tokens`` (prefix tokens + patches with position
embeddings), ``blocks``, ``pool_tokens`` (final norm + pooling), ``layer_tokens`` (the
inputs of every block, for prototypes), and ``encode_image`` (pooled features, what
``linear_probe`` reads).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from prompttune import zoo
from prompttune.backbones.base import FrozenBackbone
from prompttune.config import ConfigError
from prompttune.registry import BACKBONES
from prompttune.utils import torch_load_trusted

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FORMATS = ("auto", "mae", "moco", "timm", "npz")
POOLS = ("auto", "cls", "avg")


def _timm():
    import prompttune._tvshim  # noqa: F401  (timm imports torchvision)
    import timm

    return timm


# ------------------------------------------------------------------ checkpoint formats and provenance
def unwrap_state(state: Any) -> dict:
    """The tensor dict inside a checkpoint: ``{"model": ...}``, ``{"state_dict": ...}`` or the dict itself."""
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), dict):
                return state[key]
    return state


def mae_sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed position embedding [1, 1 + grid², dim] (``util/pos_embed.py``: zeros for CLS, then
    sin/cos of the column index in the first half of the channels and of the row index in the second)."""
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def emb(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    pe = torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.cat([emb(cols), emb(rows)], dim=1)])
    return pe.float().unsqueeze(0)


def has_mae_pos_embed(sd: dict) -> bool:
    """True when ``pos_embed`` is MAE's fixed sin-cos table (learned embeddings never are)."""
    pe = sd.get("pos_embed")
    if not isinstance(pe, torch.Tensor) or pe.ndim != 3 or pe.shape[-1] % 4:
        return False
    n = pe.shape[1] - 1
    grid = math.isqrt(max(n, 0))
    if grid * grid != n:
        return False
    return bool(torch.allclose(pe.float().cpu(), mae_sincos_pos_embed(pe.shape[-1], grid), atol=1e-4))


def inspect_checkpoint(path: Path, state: Any) -> tuple[str, str, str]:
    """(format, pooling, provenance) of a loaded checkpoint, from its keys and values.

    ``pooling`` is what the pretraining implies (``cls`` or ``avg``); ``provenance`` says why.
    """
    if path.suffix == ".npz":
        return "npz", "cls", "JAX .npz (supervised; pooled with CLS)"
    if not isinstance(state, dict):
        return "timm", "cls", "not a dict"
    inner = state.get("state_dict", state)
    if isinstance(inner, dict) and any(str(k).startswith("module.base_encoder.") for k in inner):
        return "moco", "cls", "MoCo-v3 (module.base_encoder. keys; pooled with CLS)"
    sd = unwrap_state(state)
    if not isinstance(sd, dict):
        return "timm", "cls", "not a dict"
    keys = {str(k).removeprefix("module.") for k in sd}
    if any(k.startswith("decoder") or k == "mask_token" for k in keys):
        return "mae", "avg", "MAE pretraining (decoder / mask_token keys; mean pooling + fc_norm)"
    if any(k.startswith(("head.", "pre_logits.")) for k in keys):
        pool = "avg" if "fc_norm.weight" in keys else "cls"
        return "timm", pool, f"supervised (classifier head{', fc_norm' if pool == 'avg' else ''}; pooled with {pool})"
    if "fc_norm.weight" in keys:
        return "timm", "avg", "fc_norm present (an avg-pooling model; mean pooling)"
    plain = {k.removeprefix("module."): v for k, v in sd.items()}
    if "norm.weight" in keys and has_mae_pos_embed(plain):
        return "mae", "avg", "MAE encoder (no head, fixed sin-cos position embedding; mean pooling + fc_norm)"
    return "timm", "cls", "timm state dict without head (learned position embedding; pooled with CLS)"


def detect_format(path: Path, state: Any) -> str:
    return inspect_checkpoint(path, state)[0]


def convert_state_dict(state: Any, fmt: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a checkpoint of format ``fmt`` onto the timm ``model``'s key names."""
    if not isinstance(state, dict):
        raise ValueError(f"a {fmt} checkpoint must hold a dict, got {type(state).__name__}")
    if fmt == "mae":
        sd = {k.removeprefix("module."): v for k, v in unwrap_state(state).items()}
        sd = {k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token")}
    elif fmt == "moco":
        inner = state.get("state_dict", state)
        prefix = "module.base_encoder."
        sd = {k[len(prefix):]: v for k, v in inner.items() if k.startswith(prefix)}
        if not sd:
            raise ValueError(f"MoCo-v3 checkpoint has no keys under {prefix!r}; found e.g. {list(inner)[:3]}")
    elif fmt == "timm":
        sd = {k.removeprefix("module."): v for k, v in unwrap_state(state).items()}
    else:
        raise ValueError(f"unknown checkpoint_format {fmt!r}; valid: {', '.join(FORMATS)}")
    # classifier / projection heads belong to the pretraining task, not to the backbone
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "pre_logits.")) and k != "head"}
    # the final norm goes where the model applies it: `norm` (before CLS pooling) or `fc_norm` (after the mean)
    own = model.state_dict()
    if "norm.weight" in sd and "norm.weight" not in own and "fc_norm.weight" in own:
        sd["fc_norm.weight"] = sd.pop("norm.weight")
        sd["fc_norm.bias"] = sd.pop("norm.bias")
    if "fc_norm.weight" in sd and "fc_norm.weight" not in own and "norm.weight" in own:
        sd["norm.weight"] = sd.pop("fc_norm.weight")
        sd["norm.bias"] = sd.pop("fc_norm.bias")
    # a checkpoint trained at another resolution: resample its position embeddings
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        grid = model.patch_embed.grid_size
        n_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=list(grid), num_prefix_tokens=n_prefix)
    return sd


def load_checkpoint_into(model: nn.Module, path: str | Path, fmt: str = "auto", state: Any = None) -> str:
    """Load ``path`` into the timm ViT ``model``; returns the format used. Strict on every encoder key.

    ``state``: the already-loaded checkpoint (saves reading a large file twice)."""
    path = Path(path).expanduser()
    if fmt not in FORMATS:
        raise ConfigError(f"unknown checkpoint_format {fmt!r}; valid: {', '.join(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"ViT checkpoint not found: {path}")
    if fmt == "npz" or (fmt == "auto" and path.suffix == ".npz"):
        model.load_pretrained(str(path))
        return "npz"
    if state is None:
        state = torch_load_trusted(path)
    if fmt == "auto":
        fmt = detect_format(path, state)
    sd = convert_state_dict(state, fmt, model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise ValueError(
            f"{path} ({fmt} format) does not match the ViT architecture: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; check `model` (depth, width, patch size) and `checkpoint_format`"
        )
    return fmt


# ------------------------------------------------------------------ pooling and stochastic depth, in place
def set_pooling(model: nn.Module, pool: str) -> None:
    """Switch a timm ViT between CLS pooling (final ``norm`` on every token, then CLS) and mean
    pooling (mean of the non-prefix tokens, then ``fc_norm``), moving the norm's weights with it."""
    identity = nn.Identity
    if pool == "avg" and model.global_pool != "avg":
        model.global_pool = "avg"
        if isinstance(model.fc_norm, identity) and not isinstance(model.norm, identity):
            model.fc_norm, model.norm = model.norm, identity()
    elif pool == "cls" and model.global_pool != "token":
        model.global_pool = "token"
        if isinstance(model.norm, identity) and not isinstance(model.fc_norm, identity):
            model.norm, model.fc_norm = model.fc_norm, identity()


def set_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth on every block, linearly rising to ``rate`` at the last (timm's and SPT's schedule)."""
    from timm.layers import DropPath

    depth = len(model.blocks)
    for i, blk in enumerate(model.blocks):
        p = rate * i / max(depth - 1, 1)
        for attr in ("drop_path1", "drop_path2", "drop_path"):
            if hasattr(blk, attr):
                setattr(blk, attr, DropPath(p) if p > 0 else nn.Identity())


# ------------------------------------------------------------------ the wrapper
@BACKBONES.register("vit")
class ViTBackbone(FrozenBackbone):
    def __init__(self, model: str | None = "vit_base_patch16_224", pretrained: str | bool | None = None,
                 checkpoint: str | None = None, checkpoint_format: str = "auto", pool: str = "auto",
                 zoo_entry: str | None = None, weights: str = "pretrained", img_size: int | None = None,
                 mean: Iterable[float] | None = None, std: Iterable[float] | None = None,
                 drop_path_rate: float = 0.0, model_kwargs: dict | None = None, **_: Any):
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"backbone.pool={pool!r}: expected one of {', '.join(POOLS)}")
        if checkpoint_format not in FORMATS:
            raise ConfigError(f"backbone.checkpoint_format={checkpoint_format!r}: expected one of {', '.join(FORMATS)}")
        if weights not in ("pretrained", "random"):
            raise ConfigError(f"backbone.weights={weights!r}: expected 'pretrained' or 'random'")
        if not 0.0 <= float(drop_path_rate) < 1.0:
            raise ConfigError(f"backbone.drop_path_rate={drop_path_rate!r}: expected a number in [0, 1)")
        for key, value in (("mean", mean), ("std", std)):
            if value is not None and (len(list(value)) != 3 or (key == "std" and min(value) <= 0)):
                raise ConfigError(f"backbone.{key}={list(value)!r}: expected three numbers (RGB)"
                                  + (", all > 0" if key == "std" else ""))
        timm = _timm()
        norm_mean, norm_std = IMAGENET_MEAN, IMAGENET_STD
        self.norm_source = "ImageNet statistics (VPT/SPT rule for every ViT weight)"
        if zoo_entry:
            self.model = zoo.load_model(zoo_entry, weights)
            self.name = f"zoo:{zoo_entry}" + ("" if weights == "pretrained" else f"({weights})")
            norm_mean, norm_std = zoo.get(zoo_entry).info["mean"], zoo.get(zoo_entry).info["std"]
            self.norm_source = f"the zoo entry's pretraining statistics ({zoo_entry})"
            natural = "cls" if self.model.global_pool == "token" else "avg"
            self.provenance = (f"zoo {zoo_entry} (its own pretraining; pooled with {natural})" if weights == "pretrained"
                               else f"zoo {zoo_entry} architecture, random weights (pooled with {natural})")
        else:
            if not model:
                raise ConfigError("backbone.model is empty: name a timm ViT (e.g. vit_base_patch16_224) or set "
                                  "backbone.zoo_entry")
            fmt, state = checkpoint_format, None
            natural, self.provenance = "cls", "random weights"
            if weights == "random" and fmt == "mae":  # e.g. a smoke run of an MAE config: keep its architecture
                natural, self.provenance = "avg", "random weights, pooled as MAE (checkpoint_format=mae)"
            if checkpoint and weights == "pretrained":
                p = Path(checkpoint).expanduser()
                if not p.is_file():
                    raise FileNotFoundError(f"ViT checkpoint not found: {p}")
                if p.suffix != ".npz" and fmt != "npz":
                    state = torch_load_trusted(p)
                detected, natural, self.provenance = inspect_checkpoint(p, state)
                if fmt == "auto":
                    fmt = detected
                elif fmt != detected:
                    natural = "avg" if fmt == "mae" else ("cls" if fmt in ("moco", "npz") else natural)
                    self.provenance = f"checkpoint_format={fmt} (set by the config; the keys suggest: {self.provenance})"
            elif weights == "pretrained" and not pretrained:
                raise ConfigError(f"backbone.weights=pretrained but {model!r} has no source of weights: set "
                                  "backbone.pretrained (a timm tag, or true), backbone.checkpoint, or backbone.zoo_entry "
                                  "(or weights=random for an untrained model)")
            kwargs: dict[str, Any] = {"num_classes": 0}
            if img_size:
                kwargs["img_size"] = int(img_size)
            kwargs.update(dict(model_kwargs or {}))  # architecture overrides (depth, embed_dim, patch_size, ...)
            tag = pretrained if (weights == "pretrained" and not checkpoint) else None
            name = f"{model}.{tag}" if isinstance(tag, str) and "." not in model else model
            if name.split(".")[0] not in timm.list_models():
                raise ConfigError(f"backbone.model={model!r}: not a timm model; e.g. "
                                  f"{', '.join(timm.list_models('vit_base*')[:4])}")
            self.model = timm.create_model(name, pretrained=bool(tag), **kwargs)
            if tag:
                full = getattr(self.model, "pretrained_cfg", {}).get("tag") or (name.split(".", 1) + [""])[1]
                natural = "avg" if "mae" in str(full) else ("avg" if self.model.global_pool == "avg" else "cls")
                self.provenance = f"timm hub {name.split('.')[0]}.{full} (" + (
                    "MAE: mean pooling + fc_norm)" if "mae" in str(full) else f"pooled with {natural})")
            if state is not None or (fmt == "npz" and checkpoint and weights == "pretrained"):
                fmt = load_checkpoint_into(self.model, checkpoint, fmt, state)
                self.name = f"{model}:{Path(checkpoint).name}({fmt})"
                del state
            else:
                self.name = f"{model}:{tag if tag else 'random'}"
            set_pooling(self.model, natural)
        if not hasattr(self.model, "blocks") or not hasattr(self.model, "patch_embed"):
            raise ConfigError(f"backbone {self.name} is not a ViT with patch_embed and blocks")
        if getattr(self.model, "attn_pool", None) is not None:
            raise ConfigError(f"backbone {self.name} pools with attention ('map'); prompt insertion supports "
                              "cls/avg pooling only")
        self.pool_source = "auto (from the provenance)"
        if pool != "auto":
            set_pooling(self.model, pool)
            self.pool_source = f"backbone.pool={pool} (user override)"
        self.drop_path_rate = float(drop_path_rate)
        if self.drop_path_rate > 0:
            set_drop_path(self.model, self.drop_path_rate)
        self.mean = tuple(float(v) for v in mean) if mean else tuple(norm_mean)
        self.std = tuple(float(v) for v in std) if std else tuple(norm_std)
        if mean or std:
            self.norm_source = "backbone.mean/std (user override)"
        size = self.model.patch_embed.img_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.freeze()

    def train(self, mode: bool = True) -> "ViTBackbone":
        """Eval mode always, except the ``DropPath`` layers (if any), which follow ``mode``:
        stochastic depth on the frozen blocks while training, as SPT's training does."""
        super().train(False)
        if mode and getattr(self, "drop_path_rate", 0.0) > 0:
            from timm.layers import DropPath

            for m in self.model.modules():
                if isinstance(m, DropPath):
                    m.train(True)
        return self

    def record(self) -> dict[str, Any]:
        """What a run record should say about these weights (pooling and why, normalisation, drop-path)."""
        return {"name": self.name, "pool": self.pool, "pool_source": self.pool_source,
                "provenance": self.provenance, "mean": list(self.mean), "std": list(self.std),
                "norm_source": self.norm_source, "drop_path_rate": self.drop_path_rate,
                "image_size": self.image_size}

    def describe(self) -> str:
        return f"{self.name} [pool={self.pool}; {self.provenance}]"

    # -- facts methods read -------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def patch_size(self) -> int:
        p = self.model.patch_embed.patch_size
        return int(p[0] if isinstance(p, (tuple, list)) else p)

    @property
    def num_patches(self) -> int:
        return int(self.model.patch_embed.num_patches)

    @property
    def pool(self) -> str:
        return "cls" if self.model.global_pool == "token" else "avg"

    @property
    def blocks(self) -> nn.Sequential:
        return self.model.blocks

    # -- hooks --------------------------------------------------------------------
    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, N, D]: the patch embeddings before position embeddings (SPT's layer 0)."""
        x = self.model.patch_embed(images)
        return x.flatten(1, 2) if x.ndim == 4 else x

    def embed_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, prefix + N, D]: what the first block sees (prefix tokens, position embeddings, pre-norm)."""
        m = self.model
        x = m._pos_embed(m.patch_embed(images))
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def pool_tokens(self, x: torch.Tensor, skip: int = 0) -> torch.Tensor:
        """The final norm and pooling of the last block's output [B, T, D] -> [B, D].

        ``avg`` averages every token after the prefix tokens except the first ``skip`` of
        them (prompt methods pass their prompt count to leave prompts out of the mean).
        """
        m = self.model
        x = m.norm(x)
        if m.global_pool == "token":
            x = x[:, 0]
        else:
            x = x[:, self.num_prefix_tokens + skip:].mean(dim=1)
        return m.fc_norm(x)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(images)
        return self.pool_tokens(self.model.blocks(x))

    def layer_tokens(self, images: torch.Tensor, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        """{i: [B, N, D]} for SPT's prototypes: layer 0 = ``patch_tokens``, layer i = output of
        block i-1 without the prefix (CLS/register) tokens. Runs only as deep as needed."""
        layers = sorted(set(int(i) for i in layers))
        if not layers:
            return {}
        if layers[0] < 0 or layers[-1] > self.depth:
            raise ValueError(f"layer indices must lie in 0..{self.depth}, got {layers}")
        out: dict[int, torch.Tensor] = {}
        if 0 in layers:
            out[0] = self.patch_tokens(images)
        if layers[-1] == 0:
            return out
        x = self.embed_tokens(images)
        for i, blk in enumerate(self.model.blocks[: layers[-1]]):
            x = blk(x)
            if i + 1 in layers:
                out[i + 1] = x[:, self.num_prefix_tokens:]
        return out
