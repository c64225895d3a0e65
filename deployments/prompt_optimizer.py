"""Stage 1 (CPU only): turn the user's prompt into what the text encoder will see.

For now it normalises whitespace and counts tokens with the model's real CLIP
tokenizer; the structured optimizer is a later issue and lands here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from deployments import models

CLIP_WINDOW = 77  # positions the CLIP text encoder sees, BOS and EOS included
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class OptimizedPrompt:
    prompt: str
    negative_prompt: str
    prompt_tokens: int  # CLIP tokens of the prompt, BOS/EOS excluded, before truncation
    negative_prompt_tokens: int
    truncated_tokens: int  # prompt tokens that fall outside the 77-token window
    cache_namespace: str


def normalize_whitespace(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


class PromptOptimizerEngine:
    def __init__(self, model_path: Path):
        self.tokenizer = models.load_tokenizer(Path(model_path))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def optimize(self, prompt: str, negative_prompt: str = "", cache_namespace: str = "default") -> OptimizedPrompt:
        prompt = normalize_whitespace(prompt)
        negative_prompt = normalize_whitespace(negative_prompt)
        prompt_tokens = self.count_tokens(prompt)
        return OptimizedPrompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            prompt_tokens=prompt_tokens,
            negative_prompt_tokens=self.count_tokens(negative_prompt),
            truncated_tokens=max(0, prompt_tokens - (CLIP_WINDOW - 2)),
            cache_namespace=cache_namespace,
        )


def build_deployment():
    from ray import serve

    @serve.deployment(name="PromptOptimizer", ray_actor_options={"num_cpus": 0.1, "num_gpus": 0})
    class PromptOptimizer:
        def __init__(self, model_path: str):
            self.engine = PromptOptimizerEngine(Path(model_path))

        def optimize(self, prompt: str, negative_prompt: str = "", cache_namespace: str = "default") -> OptimizedPrompt:
            return self.engine.optimize(prompt, negative_prompt, cache_namespace)

    return PromptOptimizer
