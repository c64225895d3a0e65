"""Adherence: prompts read by the optimizer's parser, scored against what an image shows."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from deployments.models.portrait import PortraitAttributes, sample_attributes
from deployments.models.portrait.adherence import expectations
from deployments.models.portrait.captions import structured_caption
from deployments.models.portrait.judge import HEADS, Reading
from deployments.models.portrait.judge_training import drawn_attributes


def perfect_reading(attributes: PortraitAttributes) -> Reading:
    """What a judge that never errs reads from a render of `attributes`."""
    values = {name: getattr(attributes, name) for name in HEADS}
    return Reading(values=values, confidence=dict.fromkeys(values, 1.0), accessories=attributes.accessories)


@pytest.fixture(scope="module")
def optimizer(tiny_model_path):
    from deployments.prompt.optimizer import PromptOptimizerEngine

    return PromptOptimizerEngine(tiny_model_path)


def test_an_image_that_shows_its_caption_adheres_fully_and_one_that_does_not_falls_short(optimizer):
    rng = random.Random(0)
    for _ in range(150):
        truth = drawn_attributes(rng)
        caption = structured_caption(truth)
        asked = expectations(optimizer.optimize(caption).attributes, caption)
        assert asked.adherence(perfect_reading(truth)) == 1.0, (caption, asked)
        other = replace(
            truth,
            expression="surprised expression" if truth.expression != "surprised expression" else "sad expression",
            background="outdoors" if truth.background != "outdoors" else "red background",
        )
        assert asked.adherence(perfect_reading(other)) < 1.0, caption


def test_expectations_of_the_issues_example(optimizer):
    prompt = "smiling woman, age:70, wearing round glasses, white hair, plain blue background"
    asked = expectations(optimizer.optimize(prompt).attributes, prompt)
    heads = {e.head: e.accepted for e in asked.expected}
    assert heads == {
        "identity": {"woman"},
        "age": {"old"},
        "expression": {"smiling expression"},
        "glasses": {"wearing round glasses"},
        "hair_color": {"white"},
        "background": {"blue background"},
    }


def test_wearing_glasses_is_met_by_any_kind_of_glasses_but_not_sunglasses():
    asked = expectations({"glasses": ["wearing glasses"]})
    base = PortraitAttributes()
    assert asked.adherence(perfect_reading(replace(base, glasses="wearing square glasses"))) == 1.0
    assert asked.adherence(perfect_reading(replace(base, glasses="wearing sunglasses"))) == 0.0


def test_what_nothing_draws_is_listed_not_scored():
    asked = expectations({"view": ["headshot", "front view"], "accessories": ["tie", "hat"]})
    assert asked.not_drawable == ("headshot", "tie")
    assert [e.asked for e in asked.expected] == ["front view", "hat"]
    assert expectations({"view": ["headshot"]}).adherence(perfect_reading(sample_attributes(random.Random(1)))) is None


def test_the_structured_caption_of_every_hair_style_reads_back_as_that_style(optimizer):
    from deployments.models.portrait.attributes import HAIR_STYLES

    for style in HAIR_STYLES:
        truth = PortraitAttributes(identity="woman", hair_style=style, hair_color="red")
        caption = structured_caption(truth)
        heads = {e.head: e.accepted for e in expectations(optimizer.optimize(caption).attributes, caption).expected}
        assert heads.get("hair_style") == {style}, (caption, heads)
        if style != "bald":
            assert heads.get("hair_color") == {"red"}, (caption, heads)


def test_an_adherence_report_counts_each_asked_attribute_on_its_own_head(tiny_model_path):
    from deployments.models.portrait.evaluation import adherence_report, held_out_prompts, read_prompts

    prompts = [p for p in held_out_prompts(60) if p.attributes.background.split()[0] in ("blue", "red", "green")][:4]
    assert len(prompts) == 4
    asked = read_prompts(tiny_model_path, [p.prompt for p in prompts])
    readings = [perfect_reading(p.attributes) for p in prompts]
    perfect = adherence_report(asked, readings)
    assert perfect.overall == 1.0 and perfect.plain_background == 1.0 and perfect.images == 4
    assert set(perfect.per_attribute.values()) == {1.0}
    # One image with the wrong background: a quarter of the plain colours missed, nothing else.
    wrong = replace(prompts[0].attributes, background="outdoors")
    report = adherence_report(asked, [perfect_reading(wrong), *readings[1:]])
    assert report.plain_background == 0.75 and report.per_attribute["background"] == 0.75
    assert report.per_attribute["expression"] == 1.0 and report.overall < 1.0
