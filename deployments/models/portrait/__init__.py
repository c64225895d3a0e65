"""The portrait world: attributes, a procedural renderer and captions (the ground truth that the
portrait model is trained on and the judge is checked against).

Plain Python on Pillow/numpy; imports nothing else of this project."""

from deployments.models.portrait.attributes import PortraitAttributes, sample_attributes
from deployments.models.portrait.renderer import render_portrait

__all__ = ["PortraitAttributes", "render_portrait", "sample_attributes"]
