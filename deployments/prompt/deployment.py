"""The PromptOptimizer deployment: the engine behind Ray Serve, with token counters.

Ray is imported when the deployment is built, not with this module: Ray Serve reads its
environment (serve_app.config.RAY_ENVIRONMENT) when it is first imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deployments.prompt.optimizer import OptimizedPrompt, PromptOptimizerEngine
from deployments.prompt.settings import PromptSettings


def build_deployment() -> Any:
    from ray import serve
    from ray.serve import metrics

    @serve.deployment(name="PromptOptimizer", ray_actor_options={"num_cpus": 0.1, "num_gpus": 0})
    class PromptOptimizer:
        def __init__(self, model_path: str, settings: PromptSettings | dict[str, Any] | None = None):
            prompt = PromptSettings.model_validate(settings or {})
            self.engine = PromptOptimizerEngine(Path(model_path), prompt.templates, prompt.default_style)
            # tokens saved = original - (optimized - template) (Grafana: configs/grafana/fusionserve.json)
            self._original = metrics.Counter(
                "fusionserve_prompt_original_tokens",
                description="CLIP tokens of prompts as written",
                tag_keys=("namespace",),
            )
            self._optimized = metrics.Counter(
                "fusionserve_prompt_optimized_tokens",
                description="CLIP tokens of prompts as sent to the encoder",
                tag_keys=("namespace",),
            )
            self._template = metrics.Counter(
                "fusionserve_prompt_template_tokens",
                description="of the optimized tokens, the namespace templates' (the server's text, not the user's)",
                tag_keys=("namespace",),
            )

        def optimize(
            self, prompt: str, negative_prompt: str = "", cache_namespace: str = "default", enabled: bool = True
        ) -> OptimizedPrompt:
            optimized = self.engine.optimize(prompt, negative_prompt, cache_namespace, enabled)
            tags = {"namespace": cache_namespace}
            if optimized.original_tokens:
                self._original.inc(optimized.original_tokens, tags=tags)
            if optimized.prompt_tokens:
                self._optimized.inc(optimized.prompt_tokens, tags=tags)
            if optimized.template_tokens:
                self._template.inc(optimized.template_tokens, tags=tags)
            return optimized

    return PromptOptimizer
