"""The prompt optimizer's settings (serve_config.yaml: args.prompt)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_STYLE = "photorealistic"  # the style a prompt gets when it names none


class PromptSettings(BaseModel):
    """The prompt optimizer: per-namespace templates put first so prompts share a prefix."""

    model_config = ConfigDict(extra="forbid")

    templates: dict[str, str] = Field(
        default_factory=lambda: {
            "studio-portrait": (
                "portrait photo, front view, head and shoulders, soft studio lighting, plain grey background"
            ),
        }
    )
    default_style: str = DEFAULT_STYLE
