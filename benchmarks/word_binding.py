"""Does the model use each attribute word? Two probes on renders of the training distribution
(never the held-out combinations), for the words the generated pictures miss most:

- **text**: how much the text encoder's pooled state moves when only that word of a fully named
  caption changes (relative L2, mean over the other values): a word the encoder lets fade
  cannot reach the UNet;
- **UNet**: a diffusion classifier. Each render is encoded by the model's VAE and noised at six
  timesteps with fixed noise; the caption naming each value of the attribute in turn (the rest
  unchanged) is scored by the UNet's v-prediction error, and the lowest error picks a value.
  A UNet whose prediction ignores the word picks at chance.
- **UNet, where it is drawn**: the same classifier, the error counted only where the word
  changes the render (each latent cell weighted by the share of its pixels that another value
  of the attribute changes, regions.changed_region): glasses or a mouth are a few cells, whose
  error the whole picture's dilutes.

    python -m benchmarks.word_binding [--model DIR]... [--count N] [--quick] [--json PATH] [--update-readme README.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.readme_table import command_line, publish, results_path
from deployments.models.portrait.attributes import ATTRIBUTE_VALUES, PortraitAttributes
from deployments.models.portrait.captions import structured_caption
from deployments.models.portrait.held_out import training_attributes
from deployments.models.portrait.renderer import render_portrait

SECTION = "word_binding"
TIMESTEPS = (100, 250, 400, 550, 700, 850)
# The words probed: the features generated pictures miss (expression, glasses, view, facial
# hair) and a colour they get right, for comparison.
PROBED: dict[str, tuple[str, ...]] = {
    name: ATTRIBUTE_VALUES[name] for name in ("expression", "glasses", "view", "facial_hair", "hair_color")
}


@dataclasses.dataclass(frozen=True)
class BindingRow:
    attribute: str
    values: int
    chance: float
    text_change: float
    unet_accuracy: float
    unet_accuracy_where_drawn: float


def load_float_components(model_dir: Path) -> Any:
    from deployments.models.portrait.model_training import load_components

    parts = load_components(model_dir)
    for module in (parts.vae, parts.text_encoder, parts.unet):
        module.float().eval()
    return parts


def portraits(attribute: str, count: int) -> list[tuple[PortraitAttributes, int]]:
    """`count` training-distribution portraits (men only for facial hair) and their seeds."""
    rng = random.Random(f"word-binding:{attribute}")
    chosen: list[tuple[PortraitAttributes, int]] = []
    while len(chosen) < count:
        candidate = training_attributes(rng)
        if attribute != "facial_hair" or candidate.identity == "man":
            chosen.append((candidate, rng.randrange(2**31)))
    return chosen


@torch.no_grad()
def probe(parts: Any, attribute: str, count: int) -> BindingRow:
    from deployments.models.portrait.regions import changed_region, latent_cell_shares

    values = PROBED[attribute]
    text_changes, correct, correct_where_drawn = [], 0, 0
    for index, (portrait, seed) in enumerate(portraits(attribute, count)):
        captions = [structured_caption(dataclasses.replace(portrait, **{attribute: v})) for v in values]
        tokens = parts.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        encoded = parts.text_encoder(tokens.input_ids)
        context, pooled = encoded[0], encoded[1]
        truth = values.index(getattr(portrait, attribute))
        others = [i for i in range(len(values)) if i != truth]
        text_changes.append(float(((pooled[others] - pooled[truth]).norm(dim=-1) / pooled[truth].norm()).mean()))
        pixels = np.asarray(render_portrait(portrait, seed), np.float32) / 127.5 - 1.0
        image = torch.from_numpy(pixels).permute(2, 0, 1)[None]
        latents = parts.vae.encode(image).latent_dist.mean * parts.vae.config.scaling_factor
        variants = [dataclasses.replace(portrait, **{attribute: values[i]}) for i in others]
        drawn = torch.from_numpy(latent_cell_shares(changed_region(portrait, variants, seed)))
        generator = torch.Generator().manual_seed(index)
        errors, errors_where_drawn = torch.zeros(len(values)), torch.zeros(len(values))
        for t in TIMESTEPS:
            noise = torch.randn(latents.shape, generator=generator)
            timestep = torch.tensor([t])
            noisy = parts.scheduler.add_noise(latents, noise, timestep).expand(len(values), -1, -1, -1)
            target = parts.scheduler.get_velocity(latents, noise, timestep)
            prediction = parts.unet(noisy, timestep.expand(len(values)), encoder_hidden_states=context).sample
            squared = (prediction - target) ** 2
            errors += squared.mean(dim=(1, 2, 3))
            errors_where_drawn += (squared * drawn).sum(dim=(1, 2, 3))
        correct += int(errors.argmin()) == truth
        correct_where_drawn += int(errors_where_drawn.argmin()) == truth
    return BindingRow(
        attribute,
        len(values),
        1 / len(values),
        float(np.mean(text_changes)),
        correct / count,
        correct_where_drawn / count,
    )


def run(models: list[str], count: int) -> dict:
    from deployments.models.loading import resolve_model

    torch.set_num_threads(2)
    began = time.perf_counter()
    results: dict[str, Any] = {"count": count, "timesteps": list(TIMESTEPS), "models": {}}
    for model in models:
        parts = load_float_components(resolve_model(model))
        rows = [probe(parts, attribute, count) for attribute in PROBED]
        results["models"][model] = [dataclasses.asdict(row) for row in rows]
    results["seconds"] = round(time.perf_counter() - began, 1)
    results["date"] = date.today().isoformat()
    results["command"] = command_line("benchmarks.word_binding")
    return results


def markdown(results: dict) -> str:
    models = list(results["models"])
    header = ["attribute", "chance"]
    for model in models:
        name = Path(model).name
        header += [
            f"text change ({name})",
            f"UNet picks the caption's value ({name})",
            f"… where it is drawn ({name})",
        ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, attribute in enumerate(PROBED):
        cells = [attribute, f"{results['models'][models[0]][i]['chance']:.0%}"]
        for model in models:
            row = results["models"][model][i]
            cells += [
                f"{row['text_change']:.1%}",
                f"**{row['unet_accuracy']:.0%}**",
                f"**{row['unet_accuracy_where_drawn']:.0%}**",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"<sub>`{results['command']}`, {results['date']}, {results['count']} training-distribution renders per "
        f"attribute, timesteps {', '.join(map(str, results['timesteps']))}; {results['seconds']} s.</sub>",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="model folder or preset, repeatable (default: portrait)")
    parser.add_argument("--count", type=int, default=40, help="renders per attribute (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="8 renders per attribute")
    parser.add_argument("--json", help="results file (default: benchmarks/results/[quick/]word_binding.json)")
    parser.add_argument("--update-readme", metavar="README")
    options = parser.parse_args(argv)
    results = run(options.model or ["portrait"], 8 if options.quick else options.count)
    json_path = results_path(SECTION, options.quick, options.json)
    publish(results, json_path, markdown(results), options.update_readme, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
