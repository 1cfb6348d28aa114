"""Tokenizer-recipe probe for the zoo's mae-vqgan-tiny (docs/zoo.md): trains only the VQ stage with
a given codebook size, label-cell weight, base width, canvas size and step count, and prints the label
reconstruction IoU (``prompttune.zoo.mae_vqgan_tiny.icl_competence``) at the requested steps.

    OMP_NUM_THREADS=1 python scripts/zoo_vq_probe.py '{"n_embed": 512, "steps": 450, "label_weight": 3.0, "evals": [150, 300, 450]}'

Keys (defaults): n_embed 512, steps 450, label_weight 3.0, ch 8, size 64 (canvas pixels; patch 8),
schedule "onecycle", lr 2e-3, batch 16, canvases 1024, seed 0, evals [steps], eval_n 96.

The data and the training step are the zoo entry's own (``training_canvases`` and
``train_tokenizer`` in ``prompttune/zoo/mae_vqgan_tiny.py``), seeded as its build seeds them, so
with the entry's settings and ``eval_n`` 128 the last line's IoU is what the build records in
meta.json (``label_recon_iou``) (same torch version and CPU).
"""

import json
import sys
import time

import torch

from prompttune.backbones.mae_vqgan import make_model
from prompttune.data.canvas import CanvasGeometry
from prompttune.zoo.mae_vqgan_tiny import icl_competence, train_tokenizer, training_canvases

DEFAULTS = {"n_embed": 512, "steps": 450, "label_weight": 3.0, "ch": 8, "size": 64, "schedule": "onecycle",
            "lr": 2e-3, "batch": 16, "canvases": 1024, "seed": 0, "eval_n": 96}


def run(cfg: dict) -> list[dict]:
    unknown = sorted(set(cfg) - set(DEFAULTS) - {"evals"})
    if unknown:
        raise SystemExit(f"unknown probe key(s) {unknown}; valid: {sorted(DEFAULTS) + ['evals']}")
    c = {**DEFAULTS, **cfg}
    evals = set(c.get("evals") or [c["steps"]])
    torch.set_num_threads(1)
    torch.manual_seed(0)  # as the build (zoo.deterministic(0)) before make_model
    model = make_model("tiny", vq={"n_embed": c["n_embed"], "ch": c["ch"], "resolution": c["size"]},
                       mae={"vocab_size": c["n_embed"], "img_size": c["size"]})
    torch.manual_seed(c["seed"])  # as _pretrain_tiny: the same canvases and batch draws
    geom = CanvasGeometry(c["size"], model.mae.patch_size, 1)
    canv, weight, _, _ = training_canvases(geom, c["canvases"], c["seed"], c["label_weight"])
    out, t0 = [], time.time()

    def on_step(step: int, rec: float) -> None:
        if step in evals:
            r = icl_competence(model, seed=c["seed"] + 2000, n=c["eval_n"])
            out.append({**cfg, "step": step, "rec_loss": round(rec, 4), "label_recon_iou": r["label_recon_iou"],
                        "seconds": round(time.time() - t0)})
            print(json.dumps(out[-1]), flush=True)

    train_tokenizer(model.vqgan, canv, weight, c["steps"], batch=c["batch"], lr=c["lr"], schedule=c["schedule"],
                    on_step=on_step)
    return out


if __name__ == "__main__":
    run(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
