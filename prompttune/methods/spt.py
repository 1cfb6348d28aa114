"""SPT: Self-Prompt Tuning (Wang et al., "Revisiting the Power of Prompt for Visual Tuning",
ICML 2024; official code WangYZ1608/Self-Prompt-Tuning).

VPT's architecture unchanged (``methods/vpt.py``: prompts after CLS, shallow ``[1, P, D]``
or deep ``[L, P, D]`` replaced at every block, a linear head), with the prompts
initialised from *downstream token prototypes* (Sec. 4, Fig. 3): the frozen backbone is
run over the training images and each layer's prompts are drawn from the tokens that
layer actually sees --

* layer 0 (shallow prompts, and the first deep set): the patch embeddings, i.e. the output
  of ``patch_embed`` before position embeddings (the official ``RepCatcher`` hook);
* layer i >= 1 (deep): the output of block i-1, CLS token removed.

Sample types (``init_type``, the official ``--prompt_sample_type``):

* ``random``: P real tokens drawn uniformly without replacement from all tokens;
* ``mean_pooling`` / ``max_pooling``: each image's token sequence is cut into P windows
  (``w = N // (P-1)``, the last window over the ``N % w`` trailing tokens, or all tokens
  if that is 0, as the official code slices), each window mean/max-pooled, then P of
  these B·P vectors are drawn at random;
* ``kmeans``: P k-means centres of the layer's tokens (Table 6's best on some datasets).

Memory stays bounded: the data are streamed in training batches and only a random
subset is kept per layer (P rows, or ``kmeans_samples`` rows for k-means), over at most
``init_images`` images (``methods/_vit_prompts.PrototypeSampler``).

Departures from the official code:

* The official code stacks the *whole* training set into one batch; here it streams, and
  reads at most ``init_images`` images (the paper notes a subset suffices).
* The official k-means centres were computed offline on a 30% subset by an unreleased
  script and read from text files; here k-means++ seeded Lloyd iterations run on a
  random subset of ``kmeans_samples`` tokens per layer, at setup.
* The official shallow variant only has random sampling from the patch embeddings; here
  every ``init_type`` also works for shallow prompts (on layer 0).
* The official scripts keep a model EMA (``--model_ema``, 0.9999) but validate and report the
  non-EMA model (``train_MAE.py:386``), so the EMA cannot change a reported number; it is not
  kept here.
* The official prototype images are drawn with replacement (``torch.randint``,
  ``train_MAE.py:105``); here the first ``init_images`` of the seeded shuffled training order,
  without replacement. Drop-path on the frozen model is ``backbone.drop_path_rate`` (the
  README recipes pass ``--drop_path 0.0``).
"""

from __future__ import annotations

from typing import Any

import torch

from prompttune.backbones.vit import ViTBackbone
from prompttune.config import ConfigError
from prompttune.methods._vit_prompts import INIT_TYPES, PrototypeSampler, check_number
from prompttune.methods.vpt import VPT
from prompttune.registry import METHODS


@METHODS.register("spt")
class SPT(VPT):
    @classmethod
    def check_config(cls, cfg: Any) -> None:
        super().check_config(cfg)
        m = cfg.method
        if "init_type" in m and m.init_type not in INIT_TYPES:
            raise ConfigError(f"method.init_type={m.init_type!r}: expected one of {', '.join(INIT_TYPES)}")
        check_number(m, "init_images", lo=1, integer=True)
        check_number(m, "kmeans_iters", lo=1, integer=True)
        check_number(m, "kmeans_samples", lo=1, integer=True)
        if m.get("init_type") == "kmeans" and int(m.get("kmeans_samples", 4096)) < int(m.get("num_prompts", 1)):
            raise ConfigError(f"method.kmeans_samples={m.kmeans_samples}: k-means needs at least num_prompts="
                              f"{m.num_prompts} tokens per layer")

    def _extra_init_args(self, init_type: str = "random", init_images: int = 1024, kmeans_samples: int = 4096,
                         kmeans_iters: int = 30, **kw: Any) -> None:
        if init_type not in INIT_TYPES:
            raise ValueError(f"spt.init_type must be one of {', '.join(INIT_TYPES)}, not {init_type!r}")
        if int(init_images) < 1:
            raise ValueError(f"spt.init_images must be >= 1, got {init_images}")
        self.init_type, self.init_images = init_type, int(init_images)
        self.kmeans_samples, self.kmeans_iters = int(kmeans_samples), int(kmeans_iters)
        self.init_stats: dict[str, Any] = {}
        super()._extra_init_args(**kw)

    def initial_prompts(self, backbone: ViTBackbone, datamodule: Any) -> torch.Tensor:
        if datamodule is None:
            raise ValueError("spt needs the data module: its prompts are initialised from the training images")
        seed = int(getattr(datamodule, "seed", 0) or 0)
        sampler = PrototypeSampler(self.init_type, self.num_prompts, self.prompt_layers(backbone),
                                   max_images=self.init_images, kmeans_samples=self.kmeans_samples,
                                   kmeans_iters=self.kmeans_iters, seed=seed)
        prompts = sampler.run(backbone, iter(self.init_batches(datamodule)))
        self.init_stats = {"images": sampler.images, "layers": len(sampler.layers), "init_type": self.init_type}
        return prompts

    @staticmethod
    def init_batches(datamodule: Any):
        if not getattr(datamodule, "datasets", None):
            datamodule.setup("fit")
        return datamodule.train_dataloader()
