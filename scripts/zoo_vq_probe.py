"""Tokenizer-recipe probe for the zoo's mae-vqgan-tiny (docs/zoo.md): trains only the VQ stage with
a given codebook size, label-cell weight and base width, and prints the label reconstruction IoU
(prompttune.zoo.mae_vqgan_tiny.icl_competence) at the requested steps.

    OMP_NUM_THREADS=1 python scripts/zoo_vq_probe.py '{"n_embed": 512, "steps": 450, "label_weight": 3.0, "evals": [150, 300, 450]}'

Its batch draws differ from the entry's build (which reseeds before training), so its numbers
are close to, not equal to, what `prompttune zoo build mae-vqgan-tiny` records in meta.json.
"""

import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from prompttune.backbones.mae_vqgan import make_model
from prompttune.data.canvas import ARRANGEMENTS, CanvasGeometry, arrangement_slots, build_canvas
from prompttune.data.pascal5i import synthetic_icl_pairs
from prompttune.zoo.mae_vqgan_tiny import icl_competence


def main(cfg: dict) -> None:
    torch.set_num_threads(1)
    n_embed, steps, lw = cfg.get("n_embed", 128), cfg.get("steps", 500), cfg.get("label_weight", 1.0)
    torch.manual_seed(0)
    model = make_model("tiny", vq={"n_embed": n_embed, "ch": cfg.get("ch", 8)}, mae={"vocab_size": n_embed})
    geom = CanvasGeometry(64, 8, 1)
    si, sm, qi, qm = synthetic_icl_pairs(1024, geom.cell, seed=1000)
    arrs = list(ARRANGEMENTS)
    arr_of = np.random.default_rng(0).integers(len(arrs), size=1024)
    canv, wmap = torch.empty(1024, 3, 64, 64), torch.ones(1024, 1, 64, 64)
    for a in range(len(arrs)):
        sel = torch.from_numpy(np.nonzero(arr_of == a)[0])
        canv[sel] = build_canvas(geom, arrs[a], si[sel], sm[sel], qi[sel], qm[sel])
        for slot in (arrangement_slots(arrs[a])[1], arrangement_slots(arrs[a])[3]):
            ys, xs = geom.cell_slice(slot)
            wmap[sel, :, ys, xs] = lw
    vq = model.vqgan
    vq.train()
    opt = torch.optim.Adam(vq.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    usage, t0 = torch.zeros(vq.n_embed), time.time()
    for step in range(steps):
        sel = torch.randint(0, 1024, (16,))
        x, wm = canv[sel], wmap[sel]
        z = vq.encode_pre_quant(2 * x - 1)
        b, d, h, w = z.shape
        idx = vq.quantize.indices(z.detach())
        zq = vq.quantize.lookup(idx, h, w)
        vq_loss = F.mse_loss(zq, z.detach()) + 0.25 * F.mse_loss(z, zq.detach())
        y = (vq.decode_quant(z + (zq - z).detach()) + 1) / 2
        loss_rec = ((y - x).abs() * wm).mean() + (((y - x) ** 2) * wm).mean()
        opt.zero_grad()
        (loss_rec + vq_loss).backward()
        opt.step()
        sched.step()
        usage.mul_(0.9).index_add_(0, idx.flatten(), torch.ones(idx.numel()))
        if step % 25 == 24 and step < steps - 50:
            dead = torch.nonzero(usage < 1e-3).flatten()
            if len(dead):
                pool = z.detach().permute(0, 2, 3, 1).reshape(-1, d)
                vq.quantize.embedding.weight.data[dead] = pool[torch.randint(0, len(pool), (len(dead),))]
                usage[dead] = 1.0
        if (step + 1) in cfg.get("evals", [steps]):
            vq.eval()
            r = icl_competence(model, seed=2000, n=96)
            vq.train()
            print(json.dumps({**cfg, "step": step + 1, "rec_loss": round(float(loss_rec.detach()), 4),
                              "label_recon_iou": r["label_recon_iou"], "seconds": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
