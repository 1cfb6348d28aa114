"""Scratch MAE recipes for the zoo ViT (docs/zoo.md, vit-mae-tiny): pretrain with the JSON settings, print the ridge probe
(on raw pixels, untrained, and every `probe_every` steps; `bg` / `probe_bg`: the pretraining / probe images' background).

    OMP_NUM_THREADS=1 python scripts/zoo_mae_probe.py '{"steps": 400, "batch": 128}'
"""
import json, math, sys, time
import numpy as np, torch
from torch import nn
torch.set_num_threads(1)
from prompttune.zoo import vit_mae_tiny as V
from prompttune.zoo._probe import ridge_probe_accuracy
from prompttune.data.world import render, sample_object, CATEGORIES, SUBCATEGORIES

cfg = dict(n_images=2048, side=32, patch=4, dim=96, depth=4, heads=3, dec_dim=64, dec_depth=1, dec_heads=4,
           steps=300, batch=128, lr=2e-3, mask=0.75, wd=0.05, probe_every=100, seed=0, warm=0.1, bg="noise",
           probe_bg="noise")
cfg.update(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
print(cfg, flush=True)
torch.manual_seed(cfg["seed"])

def gen(n, seed, side, bg=None):
    bg = bg or cfg["bg"]
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(n):
        lab = i % 16
        cat, sub = CATEGORIES[lab // 4], SUBCATEGORIES[lab % 4]
        img, _ = render([sample_object(rng, category=cat, subcategory=sub)], side, rng, bg)
        xs.append(img); ys.append(lab)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.5, torch.tensor(ys)

t0 = time.time()
side = cfg["side"]
imgs, _ = gen(cfg["n_images"], 1000 + cfg["seed"], side)
ptr_x, ptr_y = gen(384, 7321, side, cfg["probe_bg"])
pte_x, pte_y = gen(384, 7322, side, cfg["probe_bg"])
print(f"data {time.time()-t0:.1f}s", flush=True)
from timm.models.vision_transformer import VisionTransformer
model = VisionTransformer(img_size=side, patch_size=cfg["patch"], embed_dim=cfg["dim"], depth=cfg["depth"],
                          num_heads=cfg["heads"], mlp_ratio=4.0, num_classes=0, global_pool="avg", qkv_bias=True)

@torch.no_grad()
def probe():
    model.eval()
    f = lambda x: torch.cat([model(x[i:i+256]) for i in range(0, len(x), 256)])
    a = ridge_probe_accuracy(f(ptr_x), ptr_y, f(pte_x), pte_y)
    model.train(); return a

print("raw pixels probe", ridge_probe_accuracy(ptr_x.flatten(1), ptr_y, pte_x.flatten(1), pte_y), flush=True)
print("untrained probe", probe(), flush=True)
with torch.no_grad():
    model.pos_embed.copy_(V.sincos_pos_embed(model.embed_dim, model.patch_embed.grid_size[0]))
model.pos_embed.requires_grad_(False)
dec = V.MAEDecoder(model.embed_dim, model.patch_embed.num_patches, 3 * cfg["patch"] ** 2, dim=cfg["dec_dim"],
                   depth=cfg["dec_depth"], heads=cfg["dec_heads"])
params = [p for p in list(model.parameters()) + list(dec.parameters()) if p.requires_grad]
opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=(0.9, 0.95), weight_decay=cfg["wd"])
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=cfg["steps"], pct_start=cfg["warm"])
g = torch.Generator().manual_seed(0)
model.train(); dec.train()
t0 = time.time(); step = 0
while step < cfg["steps"]:
    perm = torch.randperm(len(imgs), generator=g)
    for i in range(0, len(imgs) - cfg["batch"] + 1, cfg["batch"]):
        b = imgs[perm[i:i+cfg["batch"]]]
        if torch.rand(1, generator=g).item() < 0.5: b = b.flip(-1)
        loss = V.mae_loss(model, dec, b, cfg["mask"], g, norm_pix=cfg.get("norm_pix", True))
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step(); step += 1
        if step % cfg["probe_every"] == 0 or step == cfg["steps"]:
            print(f"step {step} loss {loss.item():.4f} probe {probe():.4f} t {time.time()-t0:.0f}s", flush=True)
        if step >= cfg["steps"]: break

torch.save({"model": model.state_dict(), "cfg": cfg}, cfg.get("save", "/tmp/h2/last.pt"))
