"""The packaged judge: a regression check on a small fixed set of renders (the benchmark
measures it on held-out renders), and `fusionserve judge` on image files."""

from __future__ import annotations

import json
import random

import pytest

from deployments.models.portrait.judge import HEADS, Judge
from deployments.models.portrait.judge_training import evaluation_set, judge_accuracy
from deployments.models.portrait.renderer import render_portrait
from serve_app.ops import cli

# Heads the committed judge reads reliably (>= 97% on 1,000 held-out renders, README): all but
# expression (90.9%) and earrings (88.5%). The regression check holds them to 90% on 200
# renders so one unlucky image cannot fail it, and the two others to a floor below theirs.
RELIABLE = tuple(name for name in (*HEADS, "hat", "headscarf", "necklace") if name != "expression")


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge.packaged()


def test_the_packaged_judge_reads_renders_it_never_saw(judge):
    attributes, seeds = evaluation_set(200, seed=7)
    accuracy = judge_accuracy(judge, attributes, seeds)
    assert set(HEADS) <= set(accuracy)
    low = {name: accuracy[name] for name in RELIABLE if accuracy[name] < 0.9}
    assert not low, low
    assert accuracy["expression"] >= 0.85 and accuracy["earrings"] >= 0.8, accuracy


def test_judge_command_prints_attributes_and_adherence(tmp_path, capsys, judge):
    from deployments.models.portrait.judge_training import drawn_attributes

    truth = drawn_attributes(random.Random(3))
    path = tmp_path / "portrait.png"
    render_portrait(truth, seed=11).save(path)
    prompt = f"a portrait, {truth.background}"
    assert cli.main(["judge", str(path), "--json", "--prompt", prompt]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["image"] == str(path)
    assert set(report["attributes"]) == set(HEADS)
    assert report["attributes"] == judge.read([render_portrait(truth, seed=11)])[0].values
    assert report["adherence"] == (1.0 if report["attributes"]["background"] == truth.background else 0.0)


def test_judge_command_refuses_a_file_that_is_not_an_image(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("not a picture")
    assert cli.main(["judge", str(path)]) == 2
    assert "error:" in capsys.readouterr().err


def test_frechet_distance_is_zero_for_one_set_and_the_squared_shift_for_a_moved_one():
    import numpy as np

    from deployments.models.portrait.judge import frechet_distance

    features = np.random.default_rng(0).normal(size=(400, 6))
    assert abs(frechet_distance(features, features)) < 1e-9
    assert frechet_distance(features, features + 0.5) == pytest.approx(6 * 0.25, rel=1e-6)


def test_training_batches_blur_half_the_renders_and_do_not_teach_hidden_earrings():
    from dataclasses import replace

    from deployments.models.portrait.attributes import ACCESSORIES
    from deployments.models.portrait.judge_training import JudgeTrainingConfig, render_batch, training_batch
    from deployments.models.portrait.renderer import hidden_accessories

    config = JudgeTrainingConfig(batch_size=16)
    batch = training_batch(config, step=0)
    sharp = training_batch(replace(config, max_blur=0.0), step=0)
    blurred = [not bool((a == b).all()) for a, b in zip(batch.images, sharp.images)]
    assert 2 <= sum(blurred) <= 14  # about half, drawn per image
    assert (batch.labels == sharp.labels).all()
    # the loss's weight is 0 exactly for the earrings the hair hides
    attributes = [replace(a, accessories=frozenset({"earrings"})) for a in evaluation_set(12)[0]]
    seeds = list(range(12))
    labelled = render_batch(attributes, seeds)
    column = ACCESSORIES.index("earrings")
    hidden = [bool(hidden_accessories(a, s)) for a, s in zip(attributes, seeds)]
    assert any(hidden) and not all(hidden)
    assert labelled.accessories_shown[:, column].tolist() == [0.0 if h else 1.0 for h in hidden]
    assert labelled.accessories[:, column].tolist() == [1.0] * 12


def test_judge_training_cut_off_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    import torch

    from deployments.models.portrait.judge_training import JudgeTrainingConfig, train_judge

    config = JudgeTrainingConfig(steps=6, batch_size=4, checkpoint_every=3)
    whole = train_judge(config, tmp_path / "whole", progress=False, workers=0).net.state_dict()
    train_judge(config, tmp_path / "cut", stop_after=2, progress=False, workers=0)
    resumed = train_judge(config, tmp_path / "cut", progress=False, workers=0).net.state_dict()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
