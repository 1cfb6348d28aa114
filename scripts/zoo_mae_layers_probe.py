"""Per layer and pooling: ridge probe of a saved scratch MAE-ViT (from scripts/zoo_mae_probe.py) and of raw pixels.

    OMP_NUM_THREADS=1 python scripts/zoo_mae_layers_probe.py CHECKPOINT.pt
"""
import sys, torch, numpy as np
torch.set_num_threads(1)
from prompttune.zoo._probe import ridge_probe_accuracy
from prompttune.data.world import render, sample_object, CATEGORIES, SUBCATEGORIES
from timm.models.vision_transformer import VisionTransformer
ck = torch.load(sys.argv[1]); cfg = ck["cfg"]
def gen(n, seed, side, bg="noise"):
    rng = np.random.default_rng(seed); xs, ys = [], []
    for i in range(n):
        lab = i % 16
        img, _ = render([sample_object(rng, category=CATEGORIES[lab//4], subcategory=SUBCATEGORIES[lab%4])], side, rng, bg)
        xs.append(img); ys.append(lab)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.5, torch.tensor(ys)
side = cfg["side"]
a = gen(384, 7321, side); b = gen(384, 7322, side)
m = VisionTransformer(img_size=side, patch_size=cfg["patch"], embed_dim=cfg["dim"], depth=cfg["depth"], num_heads=cfg["heads"], num_classes=0, global_pool="avg", qkv_bias=True)
m.load_state_dict(ck["model"]); m.eval()
@torch.no_grad()
def layers(x):
    t = m._pos_embed(m.patch_embed(x)); outs = []
    for blk in m.blocks:
        t = blk(t); outs.append(t)
    return outs
la, lb = layers(a[0]), layers(b[0])
for i in range(len(la)):
    for name, f in [("avg", lambda t: t[:, 1:].mean(1)), ("cls", lambda t: t[:, 0]), ("avg+fcn", lambda t: m.fc_norm(t[:, 1:].mean(1))),
                    ("max", lambda t: t[:, 1:].max(1).values), ("avg_fcn_tok", lambda t: m.fc_norm(t[:, 1:]).mean(1))]:
        r = [ridge_probe_accuracy(f(la[i]), a[1], f(lb[i]), b[1], ridge=rr) for rr in (1.0, 0.01)]
        print(f"layer {i} {name:12s} ridge1 {r[0]:.3f} ridge.01 {r[1]:.3f}")
# raw pixels
print("pixels", ridge_probe_accuracy(a[0].flatten(1), a[1], b[0].flatten(1), b[1]), ridge_probe_accuracy(a[0].flatten(1), a[1], b[0].flatten(1), b[1], 0.01))
