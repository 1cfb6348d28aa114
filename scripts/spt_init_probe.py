"""Isolate SPT's mechanism on the zoo ViT: what the prompt initialisation alone does, before and after training.

    OMP_NUM_THREADS=1 python scripts/spt_init_probe.py [EPOCHS=10] [LR=0.01] [BACKBONE=zoo_vit_mae]   (docs/visual_prompt_tuning.md)

BACKBONE=zoo_vit_clip runs the same probe on the competent-ViT control (zoo vit-clip-tiny).
"""
import json, math, sys, time
import torch
torch.set_num_threads(1)
from prompttune.config import compose
from prompttune.runs import build_backbone, build_datamodule, build_method
from prompttune.methods._vit_prompts import prompted_forward
from prompttune.zoo._probe import ridge_probe_accuracy

seeds = [0, 1, 2]
epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
lr = float(sys.argv[2]) if len(sys.argv) > 2 else 0.01
backbone = sys.argv[3] if len(sys.argv) > 3 else "zoo_vit_mae"

def setup(method, seed, extra=()):
    cfg = compose(None, [f"method={method}", f"backbone={backbone}", "data=synth_fine_vit", "task=classification",
                         f"seed={seed}", *extra])
    bb = build_backbone(cfg); bb.eval()
    dm = build_datamodule(cfg, bb); dm.setup("fit")
    torch.manual_seed(seed)
    m = build_method(cfg); m.setup(bb, dm)
    return bb, dm, m

def batches(dm, split):
    dl = dm.train_dataloader() if split == "train" else dm.test_dataloader()
    return [(b["image"], b["label"]) for b in dl]

@torch.no_grad()
def feats(bb, prompts, data):
    return torch.cat([prompted_forward(bb, x, prompts, True) for x, _ in data]), torch.cat([y for _, y in data])

@torch.no_grad()
def attn_share(bb, prompts, x):
    """Mean attention mass the patch tokens give the prompt tokens, per block (step 0)."""
    t = bb.embed_tokens(x); k, p = bb.num_prefix_tokens, prompts.shape[1]; out = []
    t = torch.cat([t[:, :k], prompts[0].expand(len(t), -1, -1), t[:, k:]], 1)
    for i, blk in enumerate(bb.blocks):
        if i > 0:
            t = torch.cat([t[:, :k], prompts[i].expand(len(t), -1, -1), t[:, k + p:]], 1)
        h = blk.norm1(t); a = blk.attn; B, N, C = h.shape
        qkv = a.qkv(h).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        q, kk = a.q_norm(qkv[0]), a.k_norm(qkv[1])
        att = ((q * a.scale) @ kk.transpose(-2, -1)).softmax(-1)  # B h N N
        out.append(float(att[:, :, k + p:, k:k + p].sum(-1).mean()))
        t = blk(t)
    return out

def train_eval(bb, m, tr, te, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([{"params": [m.prompts], "weight_decay": 1e-4}, {"params": list(m.head.parameters()), "weight_decay": 1e-4}], lr=lr)
    total = epochs * len(tr); warm = max(1, int(0.1 * total)); step = 0
    for ep in range(epochs):
        for j in torch.randperm(len(tr), generator=g).tolist():
            x, y = tr[j]
            s = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
            for gr in opt.param_groups: gr["lr"] = lr * s
            loss = torch.nn.functional.cross_entropy(m.head(prompted_forward(bb, x, m.prompts, True)), y)
            opt.zero_grad(); loss.backward(); opt.step(); step += 1
    with torch.no_grad():
        f, y = feats(bb, m.prompts, te)
        return (m.head(f).argmax(1) == y).float()

rows = {}
t0 = time.time()
for seed in seeds:
    bb, dm, vpt = setup("vpt_deep", seed)
    _, _, spt = setup("spt_deep", seed)
    tr, te = batches(dm, "train"), batches(dm, "test")
    vp, sp = vpt.prompts.detach().clone(), spt.prompts.detach().clone()
    # VPT's random directions at SPT's per-layer prototype scale (RMS per layer)
    scaled = vp / vp.pow(2).mean((1, 2), keepdim=True).sqrt() * sp.pow(2).mean((1, 2), keepdim=True).sqrt()
    inits = {"vpt_uniform": vp, "spt_random_tokens": sp, "vpt_at_spt_scale": scaled}
    for name, P in inits.items():
        r = rows.setdefault(name, {"rms": [], "step0_ridge": [], "attn_share": [], "acc": []})
        r["rms"].append([round(float(v), 4) for v in P.pow(2).mean((1, 2)).sqrt()])
        ftr, ytr = feats(bb, P, tr); fte, yte = feats(bb, P, te)
        r["step0_ridge"].append(ridge_probe_accuracy(ftr, ytr, fte, yte))
        r["attn_share"].append([round(v, 4) for v in attn_share(bb, P, tr[0][0])])
        torch.manual_seed(seed)
        _, _, m = setup("vpt_deep", seed)
        with torch.no_grad():
            m.prompts.copy_(P)
        r["acc"].append(train_eval(bb, m, tr, te, seed))
    print(f"seed {seed} done {time.time()-t0:.0f}s", flush=True)
# token RMS per layer (the scale SPT's prototypes have), from the first training batch
summary = {"epochs": epochs, "lr": lr, "seeds": seeds}
base = torch.cat(rows["vpt_uniform"]["acc"])
for name, r in rows.items():
    acc = torch.cat(r["acc"]); d = acc - base
    # paired bootstrap over items (seeds pooled) for the difference to vpt_uniform
    g = torch.Generator().manual_seed(0); idx = torch.randint(0, len(d), (2000, len(d)), generator=g)
    bs = d[idx].mean(1).sort().values
    summary[name] = {"prompt_rms_per_layer_seed0": r["rms"][0], "step0_ridge_mean": round(sum(r["step0_ridge"]) / len(seeds), 4),
                     "step0_ridge": [round(v, 4) for v in r["step0_ridge"]],
                     "attn_share_seed0": r["attn_share"][0],
                     "acc_per_seed": [round(float(a.mean()), 4) for a in r["acc"]], "acc_mean": round(float(acc.mean()), 4),
                     "minus_vpt_uniform": [round(float(d.mean()), 4), round(float(bs[50]), 4), round(float(bs[1949]), 4)]}
print(json.dumps(summary, indent=1))
