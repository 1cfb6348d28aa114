"""Video captioning from frame folders (MSR-VTT, MSVD), and the synthetic writer.

Layouts (``layout``):

* ``msrvtt`` -- MSR-VTT's release read directly: ``ann_file`` is one JSON or a list of them,
  merged (the real release: ``[train_val_videodatainfo.json, test_videodatainfo.json]``)::

    {"videos": [{"video_id": "video0", "split": "train|validate|test", ...}],
     "sentences": [{"video_id": "video0", "caption": "...", "sen_id": 0}]}

* ``msvd`` -- the usual MSVD (YouTube2Text) distribution: ``ann_file`` lines
  ``<clip> <caption words>`` (``annotations.txt`` / ``AllVideoDescriptions.txt``; ``#`` lines
  skipped), where ``<clip>`` is the YouTube clip name (``-4wsuPCjDBc_5_15``) mapped to ``vidN``
  by ``mapping_file`` (``youtube_mapping.txt``: ``<clip> vidN`` per line), or already ``vidN``.
  Split: the standard one of Venugopalan et al. (2015), used by LAVIS's and MMICT's MSVD
  captioning: vid1-1200 train, vid1201-1300 val, vid1301-1970 test.

Frames: ``root/<frames_dir>/<video id>/*.{png,jpg,jpeg}`` (extracted beforehand, e.g. with ffmpeg;
read in name order; MSVD folders may be named by ``vidN`` or by the clip name).
``num_frames`` frames are sampled uniformly (first and last included); the backbone
concatenates their ViT tokens along the token axis before the Q-Former, as MMICT does for
multi-image segments.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from prompttune.data.base import DataError, read_json
from prompttune.data.coco_captions import CAPTION_PROMPT, InContextDataModule
from prompttune.registry import DATASETS, SYNTHETIC

FRAME_EXTS = (".png", ".jpg", ".jpeg")
SPLIT_NAMES = {"train": ("train",), "val": ("validate", "val"), "test": ("test",)}


def sample_frames(frames: list[Path], n: int) -> list[Path]:
    if len(frames) <= n:
        return frames + [frames[-1]] * (n - len(frames))  # pad short clips by repeating the last frame
    pick = np.linspace(0, len(frames) - 1, n).round().astype(int)
    return [frames[i] for i in pick]


LAYOUTS = ("msrvtt", "msvd")
MSVD_SPLITS = (("train", 1, 1200), ("val", 1201, 1300), ("test", 1301, 1970))


def _load_json(path: Path) -> Any:
    return read_json(path, f"video caption file not found: {path} (expected MSR-VTT videodatainfo JSON)")


def read_msrvtt_annotations(root: Path, ann_files: list[str]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Merge MSR-VTT ``videodatainfo`` files: ({video_id: split}, {video_id: captions})."""
    splits: dict[str, str] = {}
    caps: dict[str, list[str]] = {}
    for name in ann_files:
        path = root / name
        data = _load_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("videos"), list) \
                or not isinstance(data.get("sentences"), list):
            raise DataError(f"{path}: expected a JSON object with 'videos' and 'sentences' lists")
        for i, v in enumerate(data["videos"]):
            if "video_id" not in v or "split" not in v:
                raise DataError(f"{path}: videos[{i}] needs 'video_id' and 'split' (has {sorted(v)})")
            split = next((k for k, names in SPLIT_NAMES.items() if v["split"] in names), None)
            if split is None:
                raise DataError(f"{path}: videos[{i}] has split {v['split']!r}; expected train, validate or test")
            if v["video_id"] in splits:
                raise DataError(f"{path}: video {v['video_id']!r} is listed twice (in {', '.join(ann_files)})")
            splits[v["video_id"]] = split
        for i, sent in enumerate(data["sentences"]):
            if "video_id" not in sent or "caption" not in sent:
                raise DataError(f"{path}: sentences[{i}] needs 'video_id' and 'caption' (has {sorted(sent)})")
            caps.setdefault(sent["video_id"], []).append(sent["caption"].strip())
    return splits, caps


def read_msvd_annotations(root: Path, ann_file: str, mapping_file: str | None
                          ) -> tuple[dict[str, str], dict[str, list[str]], dict[str, str]]:
    """MSVD ``annotations.txt`` (+ ``youtube_mapping.txt``): ({vidN: split}, {vidN: captions},
    {vidN: youtube clip name})."""
    path = root / ann_file
    if not path.is_file():
        raise DataError(f"MSVD caption file not found: {path} (expected lines '<clip> <caption>', e.g. annotations.txt)")
    mapping: dict[str, str] = {}
    if mapping_file:
        mpath = root / mapping_file
        if not mpath.is_file():
            raise DataError(f"MSVD mapping file not found: {mpath} (expected lines '<youtube clip> vidN')")
        for n, line in enumerate(mpath.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not re.fullmatch(r"vid\d+", parts[1]):
                raise DataError(f"{mpath}:{n}: expected '<youtube clip> vidN', got {line!r}")
            mapping[parts[0]] = parts[1]
    caps: dict[str, list[str]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) < 2:
            raise DataError(f"{path}:{n}: expected '<clip> <caption>', got {line!r}")
        clip, cap = parts
        vid = clip if re.fullmatch(r"vid\d+", clip) else mapping.get(clip)
        if vid is None:
            raise DataError(f"{path}:{n}: clip {clip!r} is not in the mapping file "
                            f"({mapping_file or 'data.mapping_file is not set'})")
        caps.setdefault(vid, []).append(cap.strip())
    splits = {}
    for vid in caps:
        num = int(vid[3:])
        split = next((s for s, lo, hi in MSVD_SPLITS if lo <= num <= hi), None)
        if split is None:
            raise DataError(f"{path}: {vid} is outside MSVD's vid1-vid1970 (standard split)")
        splits[vid] = split
    return splits, caps, {v: k for k, v in mapping.items()}


def read_video_captions(root: str | Path, ann_file: str | list[str], frames_dir: str, num_frames: int,
                        layout: str = "msrvtt", mapping_file: str | None = None) -> dict[str, list[dict]]:
    """{split: [{paths (sampled frames), refs}]} for train / val / test."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise DataError(f"data.layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    names = [ann_file] if isinstance(ann_file, str) else [str(a) for a in ann_file]
    if layout == "msrvtt":
        splits, caps = read_msrvtt_annotations(root, names)
        clip_names: dict[str, str] = {}
    else:
        if len(names) != 1:
            raise DataError(f"data.ann_file: the msvd layout reads one annotations file, got {names}")
        splits, caps, clip_names = read_msvd_annotations(root, names[0], mapping_file)
    out: dict[str, list[dict]] = {k: [] for k in SPLIT_NAMES}
    for vid, split in splits.items():
        folder = root / frames_dir / vid
        if not folder.is_dir() and vid in clip_names:
            folder = root / frames_dir / clip_names[vid]
        frames = sorted(p for p in folder.glob("*") if p.suffix.lower() in FRAME_EXTS) if folder.is_dir() else []
        if not frames:
            raise DataError(f"no frames for video {vid!r}: expected images ({', '.join(FRAME_EXTS)}) in {folder}")
        if vid not in caps:
            raise DataError(f"{root}: video {vid!r} has no captions")
        out[split].append({"paths": [str(p) for p in sample_frames(frames, num_frames)], "refs": caps[vid]})
    return out


@DATASETS.register("video_frames")
class VideoFramesDataModule(InContextDataModule):
    kind = "caption"

    def __init__(self, root: str, ann_file: str | list[str] = "videodatainfo.json", frames_dir: str = "frames",
                 num_frames: int = 4, layout: str = "msrvtt", mapping_file: str | None = None,
                 prompt: str | list[str] = CAPTION_PROMPT, **kw: Any):
        super().__init__(root, prompt=prompt, **kw)
        self.ann_file = ann_file if isinstance(ann_file, str) else [str(a) for a in ann_file]
        self.frames_dir, self.num_frames = frames_dir, int(num_frames)
        self.layout, self.mapping_file = layout, mapping_file
        if self.num_frames < 1:
            raise DataError(f"data.num_frames must be >= 1, got {num_frames}")
        if layout not in LAYOUTS:
            raise DataError(f"data.layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")

    def check(self) -> None:
        self.ensure()
        videos = read_video_captions(self.root, self.ann_file, self.frames_dir, self.num_frames, self.layout,
                                     self.mapping_file)
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
