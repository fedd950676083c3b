"""The compose world (two objects and a relation): its pictures, held-out split, captions and scorer."""

import numpy as np
import pytest

from muse.testing import compose, demo, shapes, shapes2
from muse.testing.shapes2 import Object, Scene


def _scene_of(text: str) -> Scene:
    scene = shapes2.parse_caption(text)
    assert scene is not None, text
    return scene


def test_scorer_is_right_on_every_picture_of_the_world_held_out_scenes_included():
    rows = shapes2.make_world(300, seed=3)
    held = [sc for sc in shapes2.all_scenes() if shapes2.held_out(sc)][:60]
    rng = np.random.default_rng(7)
    rows += [(shapes2.render(sc, rng), shapes2.caption(sc, swapped=True)) for sc in held]
    r = shapes2.adherence([img for img, _ in rows], [c for _, c in rows])
    assert r["train_scenes"]["n"] == 300 and r["held_out"]["n"] == 60
    assert r["all"]["all"] == 1.0, r


def test_scorer_fails_blanks_single_objects_swapped_relations_and_wrong_shapes():
    rng = np.random.default_rng(0)
    scenes = shapes2.training_scenes()[::20]
    blank = np.full((64, 64, 3), 220, np.uint8)
    single = [shapes.render(shapes.random_scene(sc.first.colour, sc.first.shape, rng)) for sc in scenes]
    pictures = [shapes2.render(sc, rng) for sc in scenes]
    swapped = [Scene(sc.axis, sc.second, sc.first) for sc in scenes]    # the same objects the other way round
    other = [s for s in shapes.SHAPES]
    wrong = [Scene(sc.axis, sc.first, Object(sc.second.colour, other[(other.index(sc.second.shape) + 1) % 4]))
             for sc in scenes]
    for name, imgs, want in (("blank", [blank] * len(scenes), scenes), ("single", single, scenes),
                             ("swapped", pictures, swapped), ("wrong shape", pictures, wrong)):
        verdicts = [shapes2.judge(img, sc) for img, sc in zip(imgs, want)]
        assert sum(v["all"] for v in verdicts) == 0, name
    # what fails is the part that is wrong: the relation of a swapped picture, not its objects
    v = [shapes2.judge(img, sc) for img, sc in zip(pictures, swapped)]
    assert all(x["first"] and x["second"] and not x["relation"] for x in v)


def test_captions_name_one_scene_either_way_round():
    sc = Scene("h", Object("red", "circle"), Object("blue", "square"))
    assert shapes2.caption(sc) == "a red circle left of a blue square"
    assert shapes2.caption(sc, swapped=True, phrasing=1) == "a picture of a blue square right of a red circle"
    assert _scene_of(shapes2.caption(sc, swapped=True)) == sc
    up = Scene("v", Object("orange", "star"), Object("purple", "triangle"))
    assert shapes2.caption(up, swapped=True) == "a purple triangle below an orange star"
    assert all(_scene_of(shapes2.caption(s, w, p)) == s for s in shapes2.all_scenes()[::7]
               for w in (False, True) for p in range(len(shapes2.PHRASINGS)))


def test_held_out_scenes_are_a_fixed_rule_never_in_training_made_of_trained_parts():
    scenes = shapes2.all_scenes()
    held = [sc for sc in scenes if shapes2.held_out(sc)]
    assert len(scenes) == 960 and len(held) == 120
    # the rule, on the indices of (axis, colour, shape, colour, shape): 0 + 5 + 3 + 2 * (0 + 0) = 8,
    # and the mirror 0 + 0 + 0 + 2 * (5 + 3) = 16 too; 0 + 1 + 1 + 2 * (0 + 3) = 8, its mirror 10
    assert shapes2.held_out(Scene("h", Object("purple", "star"), Object("red", "circle")))
    assert shapes2.held_out(Scene("h", Object("orange", "square"), Object("red", "star")))
    assert not shapes2.held_out(Scene("h", Object("red", "star"), Object("orange", "square")))
    mirrored = [sc for sc in held if not shapes2.held_out(Scene(sc.axis, sc.second, sc.first))]
    assert len(mirrored) == 106   # the relation itself is what these test: the mirror was trained
    rows = shapes2.make_world(1000, seed=1)   # 840 training scenes: each at least once
    seen = {_scene_of(c) for _, c in rows}
    assert seen == set(shapes2.training_scenes())          # every training scene, no held-out one
    trained = shapes2.training_scenes()
    for sc in held:   # each object is trained in its place (left / above, or right / below) on that axis
        assert any(t.axis == sc.axis and t.first == sc.first for t in trained)
        assert any(t.axis == sc.axis and t.second == sc.second for t in trained)


def test_the_world_is_deterministic_per_seed():
    a, b, c = shapes2.make_world(20, seed=5), shapes2.make_world(20, seed=5), shapes2.make_world(20, seed=6)
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))


def test_every_caption_fits_the_demos_text_length_with_whole_words(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(compose.text_encoder(tmp_path))
    captions = {shapes2.caption(sc, w, p) for sc in shapes2.all_scenes() for w in (False, True)
                for p in range(len(shapes2.PHRASINGS))}
    longest = max(len(tokenizer(c)["input_ids"]) for c in captions)
    assert longest <= demo.TEXT_MAX_LENGTH, longest
    for word in tuple(shapes.COLOURS) + shapes.SHAPES + shapes2.WORDS:
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word


def test_vq_recipe_names_its_world():
    from muse.testing.shapes_vq import VQRecipe

    assert VQRecipe(world="shapes2").key() != VQRecipe().key()
    with pytest.raises(ValueError, match="VQRecipe.world"):
        VQRecipe(world="nope").key()


def test_the_compose_config_samples_its_prompts_and_eval_scores_them(tmp_path):
    """The demo's settings with compose's on top: its prompts (training and held-out scenes), and the
    `muse eval` metric named in the config, imported the way `muse eval` imports it."""
    import importlib

    from muse.config import load_config

    encoders = {"text_model": "t5", "vq_model": "vq", "codebook_size": 64, "text_dim": 32,
                "clip_model": "clip", "fid_features": "f.pt2"}
    sets = demo.demo_overrides(tmp_path, encoders, tmp_path / "urls.jsonl", False) + compose.compose_overrides(False)
    cfg = load_config(None, sets, data={})
    assert cfg.sample.prompts == compose.score_prompts() and cfg.sample.batch_size == 2 * compose.PER_PART
    scenes = [shapes2.parse_caption(p) for p in cfg.sample.prompts]
    assert sum(map(shapes2.held_out, scenes)) == compose.PER_PART and len(set(scenes)) == 2 * compose.PER_PART
    module, name = cfg.eval.metrics[0].split(":")
    metric = getattr(importlib.import_module(module), name)
    rows = shapes2.make_world(16, seed=2)
    assert metric([img for img, _ in rows], [c for _, c in rows]) == {
        "compose_first": 1.0, "compose_second": 1.0, "compose_relation": 1.0, "compose_all": 1.0}
    assert metric([img for img, _ in rows], ["a red circle"] * 16) == {}
