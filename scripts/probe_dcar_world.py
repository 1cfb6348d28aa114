"""Probe: what decides retrieval for the frozen zoo CLIP on the synthetic FDRD (docs/world.md, DCAR row).

    OMP_NUM_THREADS=1 python scripts/probe_dcar_world.py [FDRD_ROOT]   # default: the synth_fdrd cache root

1. Whole-gallery i2t R@1 over the unique test captions, and which caption word(s) each error gets wrong
   (size, colour, pattern, shape).
2. Within each look-alike group (an anchor and its one-word variants): does a caption pick its own image
   (t2i) and an image its own caption (i2t)?
3. The frozen CLIP's R@1 when a prefix precedes the caption: what front-prompt methods (CoOp, MaPLe,
   DCAR with "a photo of a") start from.
"""
import collections
import json
import sys
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from prompttune import zoo
from prompttune.backbones.clip import CLIPBackbone
from prompttune.config import cache_dir
from prompttune.data.base import ImageTransform, read_image
from prompttune.data.fdrd import LOOKALIKE_KINDS

root = Path(sys.argv[1]) if len(sys.argv) > 1 else cache_dir() / "data" / "world-fdrd-v2"
torch.set_num_threads(1)
model = zoo.load_model("clip-tiny").eval()
recs = list(json.loads((root / "FDRD/test/synth_test.json").read_text()).values())
tf = ImageTransform(32, CLIPBackbone.mean, CLIPBackbone.std)
tok = open_clip.SimpleTokenizer(context_length=model.context_length)
caps = [r["positive"] for r in recs]
uniq = sorted(set(caps))
cid = torch.tensor([uniq.index(c) for c in caps])
with torch.no_grad():
    img = F.normalize(model.encode_image(torch.stack([tf(read_image(root / "images" / f"{r['file_name']}.png"))
                                                      for r in recs])), dim=-1)
    def text(c):
        return F.normalize(model.encode_text(tok(c)), dim=-1)
    txt = text(uniq)
    cap_txt = text(caps)

top = (img @ txt.T).argmax(1)
wrong = torch.nonzero(top != cid).flatten().tolist()
words = collections.Counter()
for q in wrong:
    a, b = caps[q].split()[1:], uniq[top[q]].split()[1:]
    words["+".join(n for n, x, y in zip(("size", "colour", "pattern", "shape"), a, b) if x != y)] += 1
print(f"1. whole gallery ({len(recs)} images, {len(uniq)} unique captions): i2t R@1 {1 - len(wrong) / len(recs):.4f}; "
      f"errors by the word(s) they get wrong: {dict(words.most_common())}")

groups = collections.defaultdict(list)
for j, r in enumerate(recs):
    stem, _, kind = r["file_name"].rpartition("_")
    groups[stem if kind in LOOKALIKE_KINDS else r["file_name"]].append((j, kind if kind in LOOKALIKE_KINDS else "anchor"))
hit = collections.defaultdict(lambda: [0, 0, 0])
for members in groups.values():
    if len(members) < 2:
        continue
    idx = [j for j, _ in members]
    s = img[idx] @ cap_txt[idx].T
    for a, (_, kind) in enumerate(members):
        hit[kind][0] += int(s[:, a].argmax() == a)
        hit[kind][1] += int(s[a].argmax() == a)
        hit[kind][2] += 1
print("2. within look-alike groups, accuracy t2i / i2t:",
      {k: (round(v[0] / v[2], 3), round(v[1] / v[2], 3)) for k, v in hit.items()})

print("3. frozen CLIP with a prefix before the caption:")
for prefix in ("", "a photo of a", "x x"):
    with torch.no_grad():
        t = text([f"{prefix} {c}".strip() for c in uniq])
    s = img @ t.T
    i2t = (s.argmax(1) == cid).float().mean().item()
    t2i = (cid[s.T.argmax(1)] == torch.arange(len(uniq))).float().mean().item()
    print(f"   prefix {prefix!r:16} i2t R@1 {i2t:.3f}   t2i R@1 (each unique caption) {t2i:.3f}")
