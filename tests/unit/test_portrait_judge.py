"""The packaged judge: a regression check on a small fixed set of renders (the benchmark
measures it on held-out renders), and `fusionserve judge` on image files."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from deployments.models.portrait.attributes import ACCESSORIES
from deployments.models.portrait.judge import HEADS, Judge
from deployments.models.portrait.judge_training import evaluation_set, judge_accuracy
from deployments.models.portrait.renderer import hidden_accessories, render_portrait
from serve_app.ops import cli

# The committed judge reads every head >= 97% of 1,000 held-out renders (README; expression
# 97.5%, 90.9% before ExpressionNet). The regression check holds them to 90% on 200 renders, so
# that one unlucky image cannot fail it.
RELIABLE = (*HEADS, *ACCESSORIES)


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge.packaged()


def test_the_packaged_judge_reads_renders_it_never_saw(judge):
    attributes, seeds = evaluation_set(200, seed=7)
    accuracy = judge_accuracy(judge, attributes, seeds)
    assert set(HEADS) <= set(accuracy)
    low = {name: accuracy[name] for name in RELIABLE if accuracy[name] < 0.9}
    assert not low, low
    # expression on these 200: 97.0%; the coarse head alone (ExpressionNet's output zeroed) 93.5%
    assert accuracy["expression"] >= 0.95, accuracy


def test_the_packaged_judge_finds_earrings_where_they_show(judge):
    # ~90% of renders have no earrings showing, so accuracy alone would pass a judge that never
    # reports them (the coarse network's 88.5%): count the ones it finds (102 of 108 held-out)
    attributes, seeds = evaluation_set(200, seed=7)
    worn = [replace(a, accessories=a.accessories | {"earrings"}) for a in attributes]
    images = [render_portrait(a, s) for a, s in zip(worn, seeds)]
    shown = [i for i, (a, s, im) in enumerate(zip(worn, seeds, images)) if not hidden_accessories(a, s, im)]
    readings = judge.read([images[i] for i in shown])
    found = sum("earrings" in r.accessories for r in readings)
    assert len(shown) >= 60 and found >= 0.85 * len(shown), (found, len(shown))


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


@pytest.mark.parametrize("network", ["details", "expression"])
def test_judge_command_refuses_a_judge_from_before_one_of_its_networks(tmp_path, capsys, judge, network):
    from safetensors.torch import save_file

    path = tmp_path / "old-judge.safetensors"
    older = {k: v for k, v in judge.net.state_dict().items() if not k.startswith(f"{network}.")}
    save_file({k: v.contiguous() for k, v in older.items()}, str(path))
    image = tmp_path / "portrait.png"
    render_portrait(evaluation_set(1)[0][0], seed=1).save(image)
    assert cli.main(["judge", str(image), "--weights", str(path)]) == 2
    error = capsys.readouterr().err
    assert "train-judge" in error and f"its {network} network" in error


def test_frechet_distance_is_zero_for_one_set_and_the_squared_shift_for_a_moved_one():
    import numpy as np

    from deployments.models.portrait.judge import frechet_distance

    features = np.random.default_rng(0).normal(size=(400, 6))
    assert abs(frechet_distance(features, features)) < 1e-9
    assert frechet_distance(features, features + 0.5) == pytest.approx(6 * 0.25, rel=1e-6)


def test_training_batches_blur_half_the_renders_and_do_not_teach_hidden_earrings():
    from deployments.models.portrait.judge_training import JudgeTrainingConfig, render_batch, training_batch
    from deployments.models.portrait.renderer import accessory_pixels, hidden_accessories

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
    # the detail network's cells: 1 exactly where a 4 x 4 block holds a pixel of an earring
    cells = labelled.detail_cells[:, 0]
    for a, s, image_cells in zip(attributes, seeds, cells):
        pixels = accessory_pixels(a, s)["earrings"]
        assert image_cells.shape == (32, 32)
        assert image_cells.tolist() == pixels.reshape(32, 4, 32, 4).any(axis=(1, 3)).astype(float).tolist()
    assert all(bool(c.any()) for c, h in zip(cells, hidden) if not h)
    bare = render_batch([replace(a, accessories=frozenset()) for a in attributes], seeds)
    assert not bare.detail_cells.any()


def test_judge_training_cut_off_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    import torch

    from deployments.models.portrait.judge_training import JudgeTrainingConfig, initial_net, train_judge

    config = JudgeTrainingConfig(steps=6, batch_size=4, checkpoint_every=3, detail_steps=4, expression_steps=4)
    whole = train_judge(config, tmp_path / "whole", progress=False, workers=0).net.state_dict()
    train_judge(config, tmp_path / "cut", stop_after=2, progress=False, workers=0)  # in the coarse phase
    train_judge(config, tmp_path / "cut", stop_after=6, progress=False, workers=0)  # in the detail phase
    train_judge(config, tmp_path / "cut", stop_after=3, progress=False, workers=0)  # in the expression phase
    resumed = train_judge(config, tmp_path / "cut", progress=False, workers=0).net.state_dict()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    untrained = initial_net(config).state_dict()
    for trained_last in ("details.cells.weight", "expression.head.weight"):
        assert not torch.equal(whole[trained_last], untrained[trained_last])


@pytest.mark.parametrize("module", ["details", "expression"])
def test_a_part_s_phase_changes_that_network_alone(tmp_path, module):
    import torch

    from deployments.models.portrait.judge_training import PARTS, JudgeTrainingConfig, initial_net, train_judge_part

    config = JudgeTrainingConfig(batch_size=4, detail_steps=3, expression_steps=3)
    net = initial_net(config)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    part = next(p for p in PARTS if p.module == module)
    assert train_judge_part(part, config, net, tmp_path, progress=False, workers=0) is None
    changed = {k for k, v in net.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith(f"{module}.") for k in changed), changed


def test_expressions_are_drawn_inside_the_face_box_the_expression_network_reads():
    import numpy as np

    from deployments.models.portrait.attributes import ATTRIBUTE_VALUES
    from deployments.models.portrait.judge import FACE_BOX, JUDGE_SIZE

    left, top, right, bottom = FACE_BOX
    outside = np.ones((JUDGE_SIZE, JUDGE_SIZE), dtype=bool)
    outside[top:bottom, left:right] = False
    attributes, seeds = evaluation_set(40, seed=3)
    changed = 0
    for truth, seed in zip(attributes, seeds):
        drawn = [
            np.asarray(render_portrait(replace(truth, expression=e), seed), dtype=np.int16)
            for e in ATTRIBUTE_VALUES["expression"]
        ]
        differs = np.stack([np.abs(d - drawn[0]).max(axis=-1) > 0 for d in drawn[1:]]).any(axis=0)
        assert not (differs & outside).any(), truth
        changed += int(differs.sum())
    assert changed > 40 * 50  # the expressions do differ, by tens of pixels a face


def test_train_judge_help_names_the_recipe_s_step_counts():
    # the CLI does not import torch for --help, so its defaults are written out: they must match
    from deployments.models.portrait.judge_training import JudgeTrainingConfig

    actions = {a.dest: a for a in cli.parser()._subparsers._group_actions[0].choices["train-judge"]._actions}
    recipe = JudgeTrainingConfig()
    for field in ("steps", "detail_steps", "expression_steps"):
        assert actions[field].default is None  # absent: the recipe's
        assert actions[field].help.endswith(f"(default: the recipe's, {getattr(recipe, field)})"), field
