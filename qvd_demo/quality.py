"""What a person sees in a TinyVDM clip, measured: is the class's shape there in its colour, is the
background black, does it move at the data's speed, does it keep its size.

Every frame is matched against templates from the data's own renderer (:func:`tinyvdm.render_alpha`):
each shape, half-size 1.5 .. 8 px in 0.25 px steps, placed around the frame's bright-pixel centroid
(+-1 px in 0.5 px steps). The best template by soft IoU gives the frame's shape, size and position; the
colour is the nearest palette colour of the pixels it covers; the background is every pixel more than one
pixel away from it.

A clip is *recognised* when every frame's best template is the class's shape with IoU >= ``MIN_IOU`` and
its colour is the class's colour. :func:`quality` summarises clips and :func:`check` compares the summary
with the same figures of procedural data for the same classes (:func:`data_quality`).
"""
from __future__ import annotations

import functools

import torch

from . import tinyvdm as T

MIN_IOU = 0.5
RADII = torch.arange(1.5, 8.001, 0.25)
OFFSETS = torch.arange(-1.0, 1.001, 0.5)
# the box centre of each shape relative to its area centroid, in units of r (the triangle's is r/3 below)
_CENTROID_DY = torch.tensor([0.0, 0.0, 1.0 / 3.0])

# thresholds of :func:`check` (the reading of "looks like its data")
THRESHOLDS = {"recognised": 0.90, "background_over_data": 0.02, "speed_rel_err": 0.25, "size_stable": 0.90}
SIZE_CV_STABLE = 0.10  # a clip keeps its size when the side of its bright area varies by <= 10 % (std / mean)


def _templates(centroid: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Templates [F, S*R*O*O, H, W] around each frame's centroid [F, 2], and their (shape, r) [S*R*O*O, 2]."""
    s, r, ox, oy = torch.meshgrid(torch.arange(3.0), RADII, OFFSETS, OFFSETS, indexing="ij")
    s, r, ox, oy = s.reshape(-1).long(), r.reshape(-1), ox.reshape(-1), oy.reshape(-1)
    centre = torch.stack([centroid[:, None, 0] + ox, centroid[:, None, 1] + oy - _CENTROID_DY[s] * r], -1)
    return T.render_alpha(s, centre, r, size), torch.stack([s.float(), r], 1)


def frame_fits(video: torch.Tensor) -> dict:
    """Per-frame best template of a clip [F, 3, H, W] in [-1, 1]: shape, r, iou, colour, centroid, background."""
    if video.dim() != 4 or video.shape[1] != 3 or video.shape[2] != video.shape[3]:
        raise ValueError(f"video must be [F, 3, H, H], got {tuple(video.shape)}")
    rgb = ((video.float() + 1) / 2).clamp(0, 1)  # [F, 3, H, W], black = 0
    bright = rgb.amax(1)  # [F, H, W]
    f, size = bright.shape[0], bright.shape[-1]
    mask = bright > 0.5
    area = mask.sum((1, 2))
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    w = bright * mask
    total = w.sum((1, 2)).clamp(min=1e-6)
    centroid = torch.stack([(w * xx).sum((1, 2)) / total, (w * yy).sum((1, 2)) / total], 1)  # [F, 2]
    tmpl, params = _templates(centroid, size)  # [F, N, H, W]
    b = bright[:, None]
    iou = torch.minimum(b, tmpl).sum((2, 3)) / torch.maximum(b, tmpl).sum((2, 3)).clamp(min=1e-6)
    best = iou.argmax(1)
    fit = tmpl[torch.arange(f), best]  # [F, H, W]
    inside = fit > 0.5
    palette = (torch.tensor(list(T.COLOURS.values())) + 1) / 2
    mean_rgb = (rgb * inside[:, None]).sum((2, 3)) / inside.sum((1, 2)).clamp(min=1)[:, None]  # [F, 3]
    colour = (palette[None] - mean_rgb[:, None]).square().sum(-1).argmin(1)
    near = torch.nn.functional.max_pool2d((fit > 0).float()[:, None], 3, 1, 1)[:, 0] > 0
    far = ~near
    background = (rgb.mean(1) * far).sum((1, 2)) / far.sum((1, 2)).clamp(min=1)
    empty = area == 0
    return {"shape": params[best, 0].long(), "r": params[best, 1], "iou": torch.where(empty, 0.0, iou.max(1).values),
            "colour": colour, "centroid": centroid, "background": background, "area": area, "empty": empty}


def clip_quality(video: torch.Tensor, cond) -> dict:
    """One clip's figures: recognised (0/1), frames recognised, background, speed (px/frame), size variation.

    Size variation is the std / mean over frames of the square root of the bright area (pixels > half
    brightness); a frame with no bright pixel makes it infinite.
    """
    cid = T.class_id(cond)
    if cid == T.NULL_CLASS:
        raise ValueError("quality needs the clip's class; the unconditional class has no shape to recognise")
    fits = frame_fits(video)
    ok = ((fits["shape"] == cid // len(T.COLOURS)) & (fits["colour"] == cid % len(T.COLOURS))
          & (fits["iou"] >= MIN_IOU) & ~fits["empty"])
    c = fits["centroid"]
    speed = (c[1:] - c[:-1]).norm(dim=1).mean().item()
    side = fits["area"].float().sqrt()  # what a person sees as size: the bright area, not the template's r
    size_cv = (side.std(unbiased=False) / side.mean().clamp(min=1e-6)).item() if side.min() > 0 else float("inf")
    return {"recognised": float(bool(ok.all())), "frames_recognised": ok.float().mean().item(),
            "iou": fits["iou"].mean().item(), "background": fits["background"].mean().item(),
            "speed": speed, "size_cv": size_cv, "size_stable": float(size_cv <= SIZE_CV_STABLE)}


def quality(clips, conds) -> dict:
    """Mean of :func:`clip_quality` over clips (fractions for recognised / size_stable), and the clip count."""
    clips, conds = list(clips), list(conds)
    if not clips or len(clips) != len(conds):
        raise ValueError(f"need one class per clip and at least one clip, got {len(clips)} clips, {len(conds)} classes")
    per = [clip_quality(v, c) for v, c in zip(clips, conds)]
    out = {k: sum(p[k] for p in per) / len(per) for k in per[0]}
    out["clips"] = len(per)
    return out


def data_quality(conds, seed: int = 0) -> dict:
    """:func:`quality` of procedural data clips of the same classes (seeded): the figures to compare with.

    Cached per (classes, seed): the ablation asks for the same reference once per configuration."""
    return dict(_data_quality(tuple(T.class_id(c) for c in conds), int(seed)))


@functools.lru_cache(maxsize=8)
def _data_quality(ids: tuple, seed: int) -> dict:
    clips = T.make_clips(list(ids), torch.Generator().manual_seed(seed))
    return quality(list(clips), list(ids))


def check(q: dict, data: dict) -> dict:
    """Each threshold of :data:`THRESHOLDS` as {name: (value, limit, passed)} for a summary ``q`` vs ``data``."""
    t = THRESHOLDS
    rel = abs(q["speed"] / data["speed"] - 1) if data["speed"] > 0 else float("inf")
    over = q["background"] - data["background"]
    return {
        "recognised": (q["recognised"], t["recognised"], q["recognised"] >= t["recognised"]),
        "background_over_data": (over, t["background_over_data"], over <= t["background_over_data"]),
        "speed_rel_err": (rel, t["speed_rel_err"], rel <= t["speed_rel_err"]),
        "size_stable": (q["size_stable"], t["size_stable"], q["size_stable"] >= t["size_stable"]),
    }


def table(rows: dict, data: dict) -> list[str]:
    """Markdown rows of the statistic for named summaries ``rows`` ({"FP": q, ...}) beside the data's."""
    lines = ["| clips | recognised (class shape + colour, every frame) | frames recognised | background (0 = black) "
             "| speed px/frame | size variation | size stable |", "|---|---|---|---|---|---|---|"]
    for name, q in {**rows, "data": data}.items():
        lines.append(f"| {name} ({q['clips']}) | {q['recognised']:.0%} | {q['frames_recognised']:.0%} "
                     f"| {q['background']:.3f} | {q['speed']:.2f} | {q['size_cv']:.3f} | {q['size_stable']:.0%} |")
    t = THRESHOLDS
    lines.append(f"\nThresholds: recognised >= {t['recognised']:.0%}, background <= data + {t['background_over_data']}, "
                 f"speed within {t['speed_rel_err']:.0%} of the data's, size stable (variation <= {SIZE_CV_STABLE}) "
                 f"in >= {t['size_stable']:.0%} of clips.")
    return lines
