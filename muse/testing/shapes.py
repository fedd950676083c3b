"""A tiny world that a small Muse can learn on a CPU, and a deterministic judge of its pictures.

Each picture is one upright shape (circle, square, triangle, five-pointed star) filled
with one of six named colours, at a varied position and size, on a plain light-grey
background of varied shade. Captions name the colour and the shape in a few phrasings.
A few colour x shape pairs are held out of the training rows to measure compositional
generalisation separately.

The scorer needs no learned model, so its verdict cannot drift with training:
- colour: the object's pixels (saturated, in the largest connected blob) -> mean hue ->
  the nearest of the six colour hues;
- shape: each shape's template is drawn into the blob's bounding box with the same
  code that draws the world; the best intersection-over-union names the shape.
"""

from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (235, 210, 25),
           "green": (40, 165, 60), "blue": (40, 80, 220), "purple": (145, 50, 185)}
SHAPES = ("circle", "square", "triangle", "star")
HELD_OUT = (("purple", "triangle"), ("green", "star"), ("orange", "square"))
PHRASINGS = ("{a} {c} {s}", "{a} {c} {s} on a light background", "a picture of {a} {c} {s}", "{c} {s}")
_HUES = {name: colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] for name, rgb in COLOURS.items()}
_SUPERSAMPLE = 4


def _star(n: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = [((1 if i % 2 == 0 else inner) * np.cos(np.pi / 2 + i * np.pi / n),
            -(1 if i % 2 == 0 else inner) * np.sin(np.pi / 2 + i * np.pi / n)) for i in range(2 * n)]
    xs, ys = zip(*pts)
    return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in pts]


# Each shape as a polygon in its unit bounding box (y down) and the box's height / width.
_UNIT = {"square": [(0, 0), (1, 0), (1, 1), (0, 1)], "triangle": [(0.5, 0), (1, 1), (0, 1)], "star": _star()}
ASPECT = {"circle": 1.0, "square": 1.0, "triangle": np.sqrt(3) / 2, "star": 0.951}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """Fill `shape` exactly into box (x0, y0, x1, y1): the world and the scorer share this."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in _UNIT[shape]], fill=fill)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    width: float        # bounding-box width in pixels
    cx: float
    cy: float
    background: int     # grey level


WIDTH = (0.6, 0.75)   # of the picture
JITTER = 0.06          # the centre moves up to this fraction of the picture from the middle (+-1 token)


def random_scene(colour: str, shape: str, rng: np.random.Generator, size: int = 64) -> Scene:
    """Width, position and background grey (200-240) drawn at random.

    The jitter is small on purpose: with +-12% four CPU minutes learned less (bench/RESULTS.md)."""
    width = size * rng.uniform(*WIDTH)
    jitter = size * JITTER
    return Scene(colour, shape, width, size / 2 + rng.uniform(-jitter, jitter),
                 size / 2 + rng.uniform(-jitter, jitter), int(rng.integers(200, 241)))


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """-> uint8 (size, size, 3), anti-aliased by drawing at 4x and averaging down."""
    s = _SUPERSAMPLE
    img = Image.new("RGB", (size * s, size * s), (scene.background,) * 3)
    h = scene.width * ASPECT[scene.shape]
    box = ((scene.cx - scene.width / 2) * s, (scene.cy - h / 2) * s,
           (scene.cx + scene.width / 2) * s, (scene.cy + h / 2) * s)
    draw_shape(ImageDraw.Draw(img), scene.shape, box, COLOURS[scene.colour])
    return np.asarray(img.resize((size, size), Image.Resampling.BOX))


def all_prompts(per_pair: int = 1) -> list[str]:
    """Every colour x shape caption, held-out pairs included, each `per_pair` times in a row."""
    return [caption(c, s) for c in COLOURS for s in SHAPES for _ in range(per_pair)]


def training_pairs() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT]


def make_world(n: int, seed: int = 0, size: int = 64) -> list[tuple[np.ndarray, str]]:
    """n training rows [(image, caption)], every training pair n / 21 times (held-out pairs never)."""
    rng = np.random.default_rng(seed)
    pairs = training_pairs()
    rows = []
    for i in range(n):
        colour, shape = pairs[i % len(pairs)]
        rows.append((render(random_scene(colour, shape, rng, size), size),
                     caption(colour, shape, (i // len(pairs)) % len(PHRASINGS))))
    return rows


def caption(colour: str, shape: str, phrasing: int = 0) -> str:
    """caption("orange", "star") -> "an orange star"; other phrasings name the same pair."""
    return PHRASINGS[phrasing].format(a="an" if colour[0] in "aeiou" else "a", c=colour, s=shape)


# ----------------------------------------------------------------------------- the scorer

_CAPTION = re.compile(r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")\b")


def parse_caption(caption: str) -> tuple[str, str] | None:
    """"a picture of a red circle" -> ("red", "circle"); None when it names no pair."""
    m = _CAPTION.search(caption.lower())
    return (m.group(1), m.group(2)) if m else None


def saturated(image: np.ndarray) -> np.ndarray:
    """The pixels coloured enough to be an object's (the background is grey)."""
    hsv = np.asarray(Image.fromarray(image).convert("HSV"), dtype=np.float32) / 255
    return (hsv[..., 1] > 0.35) & (hsv[..., 2] > 0.25)


def object_mask(image: np.ndarray) -> np.ndarray:
    """The largest connected blob of saturated pixels (the background is grey)."""
    from scipy import ndimage

    mask = saturated(image)
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def classify(image: np.ndarray, min_pixels: int = 20) -> tuple[str | None, str | None, float]:
    """-> (colour, shape, IoU of the best shape); (None, None, 0) when there is no object."""
    mask = object_mask(image)
    if mask.sum() < min_pixels:
        return None, None, 0.0
    shape, iou = blob_shape(mask)
    return blob_colour(image, mask), shape, iou


def blob_colour(image: np.ndarray, mask: np.ndarray) -> str:
    """The named colour nearest the circular mean hue of the blob's pixels."""
    hue = np.asarray(Image.fromarray(image).convert("HSV"))[..., 0][mask] / 256.0
    mean_hue = (np.angle(np.exp(2j * np.pi * hue).mean()) / (2 * np.pi)) % 1.0   # circular mean
    return min(_HUES, key=lambda c: min(abs(_HUES[c] - mean_hue), 1 - abs(_HUES[c] - mean_hue)))


def blob_shape(mask: np.ndarray) -> tuple[str, float]:
    """-> (shape, IoU): each shape drawn into the blob's bounding box, the best overlap wins."""
    ys, xs = np.nonzero(mask)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    ious = {}
    for shape in SHAPES:
        s = _SUPERSAMPLE
        tpl = Image.new("L", (mask.shape[1] * s, mask.shape[0] * s), 0)
        draw_shape(ImageDraw.Draw(tpl), shape, tuple(v * s for v in box), 255)
        t = np.asarray(tpl.resize(mask.shape[1::-1], Image.Resampling.BOX)) > 127
        ious[shape] = (t & mask).sum() / max((t | mask).sum(), 1)
    shape = max(ious, key=ious.get)
    return shape, float(ious[shape])


def adherence(images: np.ndarray, captions: list[str]) -> dict:
    """Fraction of pictures whose colour / shape / both match their caption, overall,
    for the training pairs and for the held-out pairs."""
    rows = []
    for img, cap in zip(images, captions):
        want = parse_caption(cap)
        if want is None:
            continue
        colour, shape, _ = classify(np.asarray(img))
        rows.append((want, colour == want[0], shape == want[1]))

    def summary(sel):
        n = len(sel)
        return {"n": n, "colour": sum(r[1] for r in sel) / max(n, 1), "shape": sum(r[2] for r in sel) / max(n, 1),
                "both": sum(r[1] and r[2] for r in sel) / max(n, 1)}

    return {"all": summary(rows), "train_pairs": summary([r for r in rows if r[0] not in HELD_OUT]),
            "held_out": summary([r for r in rows if r[0] in HELD_OUT])}
