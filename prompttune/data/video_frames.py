"""Video captioning from frame folders (MSR-VTT / MSVD style), and the synthetic writer.

Layout::

    root/videodatainfo.json     {"videos": [{"video_id": "video0", "split": "train|validate|test"}],
                                 "sentences": [{"video_id": "video0", "caption": "..."}]}
    root/frames/video0/000001.png ...   (frames extracted beforehand, e.g. with ffmpeg; any of
                                         .png/.jpg/.jpeg, read in name order)

This is MSR-VTT's ``train_val_videodatainfo.json`` layout; MSVD is converted to it by
listing its clips and captions the same way. ``num_frames`` frames are sampled uniformly
(first and last included); the backbone concatenates their ViT tokens along the token axis
before the Q-Former, as MMICT does for multi-image segments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from prompttune.data.base import DataError
from prompttune.data.coco_captions import CAPTION_PROMPT, InContextDataModule
from prompttune.registry import DATASETS, SYNTHETIC

FRAME_EXTS = (".png", ".jpg", ".jpeg")
SPLIT_NAMES = {"train": ("train",), "val": ("validate", "val"), "test": ("test",)}


def sample_frames(frames: list[Path], n: int) -> list[Path]:
    if len(frames) <= n:
        return frames + [frames[-1]] * (n - len(frames))  # pad short clips by repeating the last frame
    pick = np.linspace(0, len(frames) - 1, n).round().astype(int)
    return [frames[i] for i in pick]


def read_video_captions(root: str | Path, ann_file: str, frames_dir: str, num_frames: int) -> dict[str, list[dict]]:
    root = Path(root)
    path = root / ann_file
    if not path.is_file():
        raise DataError(f"video caption file not found: {path} (expected MSR-VTT-style videodatainfo JSON)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("videos"), list) or not isinstance(data.get("sentences"), list):
        raise DataError(f"{path}: expected a JSON object with 'videos' and 'sentences' lists")
    caps: dict[str, list[str]] = {}
    for i, s in enumerate(data["sentences"]):
        if "video_id" not in s or "caption" not in s:
            raise DataError(f"{path}: sentences[{i}] needs 'video_id' and 'caption' (has {sorted(s)})")
        caps.setdefault(s["video_id"], []).append(s["caption"].strip())
    out: dict[str, list[dict]] = {k: [] for k in SPLIT_NAMES}
    for i, v in enumerate(data["videos"]):
        if "video_id" not in v or "split" not in v:
            raise DataError(f"{path}: videos[{i}] needs 'video_id' and 'split' (has {sorted(v)})")
        split = next((k for k, names in SPLIT_NAMES.items() if v["split"] in names), None)
        if split is None:
            raise DataError(f"{path}: videos[{i}] has split {v['split']!r}; expected train, validate or test")
        folder = root / frames_dir / v["video_id"]
        frames = sorted(p for p in folder.glob("*") if p.suffix.lower() in FRAME_EXTS) if folder.is_dir() else []
        if not frames:
            raise DataError(f"no frames for video {v['video_id']!r}: expected images ({', '.join(FRAME_EXTS)}) in {folder}")
        if v["video_id"] not in caps:
            raise DataError(f"{path}: video {v['video_id']!r} has no captions")
        out[split].append({"paths": [str(p) for p in sample_frames(frames, num_frames)], "refs": caps[v["video_id"]]})
    return out


@DATASETS.register("video_frames")
class VideoFramesDataModule(InContextDataModule):
    kind = "caption"

    def __init__(self, root: str, ann_file: str = "videodatainfo.json", frames_dir: str = "frames",
                 num_frames: int = 4, prompt: str = CAPTION_PROMPT, **kw: Any):
        super().__init__(root, **kw)
        self.ann_file, self.frames_dir, self.num_frames, self.prompt = ann_file, frames_dir, int(num_frames), prompt
        if self.num_frames < 1:
            raise DataError(f"data.num_frames must be >= 1, got {num_frames}")

    def check(self) -> None:
        self.ensure()
        videos = read_video_captions(self.root, self.ann_file, self.frames_dir, self.num_frames)
        self.rows = {}
        for split, vids in videos.items():
            if split == "train":
                self.rows[split] = [{"paths": v["paths"], "video": True, "prompt": self.prompt, "target": c,
                                     "refs": v["refs"]} for v in vids for c in v["refs"]]
            else:
                self.rows[split] = [{"paths": v["paths"], "video": True, "prompt": self.prompt,
                                     "target": v["refs"][0], "refs": v["refs"]} for v in vids]
        self.check_rows()

    def info(self) -> dict[str, Any]:
        return {"kind": "caption", "prompt": self.prompt, "num_frames": self.num_frames}


@SYNTHETIC.register("video_frames")
def write_video_frames(root: Path, n_train: int = 32, n_val: int = 4, n_test: int = 16, frames: int = 6, side: int = 32,
                       seed: int = 0, background: str = "plain") -> None:
    """Clips of one object moving in a straight line; captions name it and its direction."""
    from prompttune.data.world import render, sample_object, save_png

    root = Path(root)
    rng = np.random.default_rng(seed)
    videos, sentences = [], []
    k = 0
    moves = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    for split, n in (("train", n_train), ("validate", n_val), ("test", n_test)):
        for _ in range(n):
            vid = f"video{k}"
            k += 1
            obj = sample_object(rng, size="small")
            direction = list(moves)[int(rng.integers(4))]
            dx, dy = moves[direction]
            folder = root / "frames" / vid
            folder.mkdir(parents=True, exist_ok=True)
            for f in range(frames):
                t = f / max(frames - 1, 1) - 0.5
                obj.cx, obj.cy = 0.5 + 0.45 * dx * t, 0.5 + 0.45 * dy * t
                img, _ = render([obj], side, np.random.default_rng(seed * 7919 + k * 31 + f), background)
                save_png(folder / f"{f + 1:06d}.png", img)
            videos.append({"video_id": vid, "split": split, "category": 0})
            for cap in (f"a {obj.color} {obj.subcategory} {obj.category} moves {direction}",
                        f"a {obj.subcategory} {obj.category} moving {direction}",
                        f"a {obj.color} {obj.category} moves {direction}"):
                sentences.append({"video_id": vid, "caption": cap})
    (root / "videodatainfo.json").write_text(json.dumps({"videos": videos, "sentences": sentences}))
