"""The compose world: two coloured shapes and where one is relative to the other, and its judge.

Each picture holds two objects of the shapes world (`muse.testing.shapes`: the same six colours,
four shapes and drawing code), of two different colours, side by side or one above the other,
on a light-grey background. Its caption names both and the relation, phrased either way round:
"a red circle left of a blue square" and "a blue square right of a red circle" are one scene,
as are "above" and "below".

A scene is (axis, first object, second object), the first being the left or upper one. Held out
of training, by a fixed rule on the scene's parts (`held_out`), are 120 of the 960 scenes: every
object and every pair of colours still appears in training, but never those objects in that
arrangement, so the held-out prompts measure composition, not memory.

64 px pictures, as the demo (the base model's 16x16 tokens of a VQ like the demo's, f4, trained on
this world): each object is 36-44% of the picture wide (23-28 px, 6-7 tokens), the most two objects
can take along one axis with a gap between them. At 28-36% the VQ filled in the stars' points and
its own reconstructions were only 72% right (bench/RESULTS.md "compose").

The scorer needs no learned model: the saturated pixels' connected blobs, each named by its mean
hue (`shapes.blob_colour`) and its best shape template (`shapes.blob_shape`); the prompt's two
objects are the largest blob of each named colour, and the relation compares their centroids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from muse.testing.shapes import (ASPECT, COLOURS, SHAPES, _SUPERSAMPLE, blob_colour, blob_shape, draw_shape,
                                 saturated)

# The relation words per axis: the first object is left of / above the second; the swapped phrasing
# names the second object first.
RELATIONS = {"h": ("left of", "right of"), "v": ("above", "below")}
PHRASINGS = ("{a1} {c1} {s1} {rel} {a2} {c2} {s2}", "a picture of {a1} {c1} {s1} {rel} {a2} {c2} {s2}")
WIDTH = (0.36, 0.44)      # each object's width, of the picture
CENTRE = 0.25             # along the axis: the objects' centres at 25% and 75% of the picture
JITTER = 0.02             # along the axis, each centre moves up to this; across it, up to ACROSS
ACROSS = 0.08
WORDS = ("left", "right", "above", "below")   # whole T5 tokens, beside the colours and the shapes


@dataclass(frozen=True)
class Object:
    colour: str
    shape: str


@dataclass(frozen=True)
class Scene:
    axis: str           # "h": first left of second; "v": first above second
    first: Object
    second: Object


def all_scenes() -> list[Scene]:
    """Every scene: two objects of different colours (the scorer tells objects apart by colour)."""
    objects = [Object(c, s) for c in COLOURS for s in SHAPES]
    return [Scene(axis, a, b) for axis in RELATIONS for a in objects for b in objects if a.colour != b.colour]


def held_out(scene: Scene) -> bool:
    """The rule: axis + first colour + first shape + 2 x (second colour + second shape), as indices, is a
    multiple of 8 (120 of 960 scenes). The second object counts twice so that a scene and its mirror
    (the same objects swapped) are apart: 106 of the 120 have their mirror in training, which then
    tests the relation itself (a sum without weights held out both, or neither)."""
    c, s = list(COLOURS), list(SHAPES)
    total = (list(RELATIONS).index(scene.axis) + c.index(scene.first.colour) + s.index(scene.first.shape)
             + 2 * (c.index(scene.second.colour) + s.index(scene.second.shape)))
    return total % 8 == 0


def training_scenes() -> list[Scene]:
    return [sc for sc in all_scenes() if not held_out(sc)]


def caption(scene: Scene, swapped: bool = False, phrasing: int = 0) -> str:
    """caption(red circle left of blue square) -> "a red circle left of a blue square"; swapped ->
    "a blue square right of a red circle"."""
    a, b = (scene.second, scene.first) if swapped else (scene.first, scene.second)
    art = lambda o: "an" if o.colour[0] in "aeiou" else "a"  # noqa: E731
    return PHRASINGS[phrasing].format(a1=art(a), c1=a.colour, s1=a.shape, rel=RELATIONS[scene.axis][swapped],
                                      a2=art(b), c2=b.colour, s2=b.shape)


def render(scene: Scene, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """-> uint8 (size, size, 3): sizes, positions and background grey (200-240) drawn from rng."""
    s = _SUPERSAMPLE
    img = Image.new("RGB", (size * s, size * s), (int(rng.integers(200, 241)),) * 3)
    draw = ImageDraw.Draw(img)
    for obj, along in ((scene.first, CENTRE), (scene.second, 1 - CENTRE)):
        w = size * rng.uniform(*WIDTH)
        h = w * ASPECT[obj.shape]
        a = size * (along + rng.uniform(-JITTER, JITTER))
        b = size * (0.5 + rng.uniform(-ACROSS, ACROSS))
        cx, cy = (a, b) if scene.axis == "h" else (b, a)
        draw_shape(draw, obj.shape, ((cx - w / 2) * s, (cy - h / 2) * s, (cx + w / 2) * s, (cy + h / 2) * s),
                   COLOURS[obj.colour])
    return np.asarray(img.resize((size, size), Image.Resampling.BOX))


def make_world(n: int, seed: int = 0, size: int = 64) -> list[tuple[np.ndarray, str]]:
    """n training rows [(image, caption)]: the training scenes in a seeded random order, cycled,
    each phrasing and each way round in turn."""
    rng = np.random.default_rng(seed)
    scenes = training_scenes()
    order = rng.permutation(len(scenes))
    rows = []
    for i in range(n):
        scene = scenes[order[i % len(scenes)]]
        k = i // len(scenes)
        rows.append((render(scene, rng, size), caption(scene, swapped=bool(k % 2),
                                                       phrasing=(k // 2) % len(PHRASINGS))))
    return rows


def prompts(per_scene: int = 1, held: bool | None = None, seed: int = 0) -> list[str]:
    """Evaluation prompts: `per_scene` captions of each scene, training scenes (held=False), held-out
    ones (True) or all (None); scenes in a seeded order so a prefix is a sample, and every other
    caption phrased the other way round ("... right of ...", "... below ...")."""
    scenes = [sc for sc in all_scenes() if held is None or held_out(sc) == held]
    order = np.random.default_rng(seed).permutation(len(scenes))
    picks = [scenes[j] for j in order for _ in range(per_scene)]
    return [caption(sc, swapped=bool(i % 2)) for i, sc in enumerate(picks)]


# ----------------------------------------------------------------------------- the scorer

_OBJ = r"(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")"
_REL = "|".join(r for pair in RELATIONS.values() for r in pair)
_CAPTION = re.compile(_OBJ + r"\s+(" + _REL + r")\s+an?\s+" + _OBJ)


def parse_caption(text: str) -> Scene | None:
    """"a blue square right of a red circle" -> Scene("h", red circle, blue square); None if no match."""
    m = _CAPTION.search(text.lower())
    if not m:
        return None
    a, rel, b = Object(m.group(1), m.group(2)), m.group(3), Object(m.group(4), m.group(5))
    axis = next(ax for ax, pair in RELATIONS.items() if rel in pair)
    return Scene(axis, a, b) if rel == RELATIONS[axis][0] else Scene(axis, b, a)


def blobs(image: np.ndarray, min_pixels: int = 12) -> list[tuple[str, np.ndarray]]:
    """Every connected blob of saturated pixels of at least min_pixels, as (colour, mask), largest first."""
    from scipy import ndimage

    labels, n = ndimage.label(saturated(image))
    out = [labels == i for i in range(1, n + 1)]
    out = sorted((m for m in out if m.sum() >= min_pixels), key=lambda m: -int(m.sum()))
    return [(blob_colour(image, m), m) for m in out]


def judge(image: np.ndarray, scene: Scene) -> dict:
    """-> {first, second (colour and shape right), relation (centroids along the axis, the larger offset),
    all}. Each object is the largest blob of its colour; a missing one fails it and the relation."""
    found = {}
    for colour, mask in blobs(np.asarray(image)):
        found.setdefault(colour, mask)
    out = {}
    centres = []
    for key, obj in (("first", scene.first), ("second", scene.second)):
        mask = found.get(obj.colour)
        out[key] = mask is not None and blob_shape(mask)[0] == obj.shape
        if mask is not None:
            ys, xs = np.nonzero(mask)
            centres.append((xs.mean(), ys.mean()))
    out["relation"] = False
    if len(centres) == 2:
        dx, dy = centres[1][0] - centres[0][0], centres[1][1] - centres[0][1]
        along, across = (dx, dy) if scene.axis == "h" else (dy, dx)
        out["relation"] = bool(along > abs(across))
    out["all"] = out["first"] and out["second"] and out["relation"]
    return out


def adherence(images, captions: list[str]) -> dict:
    """Fractions of pictures with the first / second object, the relation and all three right, for
    prompts of training scenes and of held-out scenes apart."""
    rows = []
    for img, cap in zip(images, captions):
        scene = parse_caption(cap)
        if scene is not None:
            rows.append((held_out(scene), judge(np.asarray(img), scene)))

    def summary(sel):
        n = max(len(sel), 1)
        return {"n": len(sel), **{k: sum(r[k] for r in sel) / n for k in ("first", "second", "relation", "all")}}

    return {"all": summary([r for _, r in rows]), "train_scenes": summary([r for h, r in rows if not h]),
            "held_out": summary([r for h, r in rows if h])}
