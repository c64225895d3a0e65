"""Stage 1 (CPU only): turn the user's instruction into a compact structured prompt.

`Asian man, age:35, smiling expression, wearing glasses, soft lighting, photorealistic,
sharp focus`: the namespace's template first (so prompts of one namespace share a token
prefix the text encoder can cache), then identity, attributes in a fixed key order,
anything not understood, style, and quality terms last (the first to go when the 77-token
CLIP window is exceeded). Token counts use the model's own CLIP tokenizer.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deployments.models import builder, loading
from deployments.prompt import attributes as attribute_values
from deployments.prompt.attributes import Attributes
from deployments.prompt.lexicon import Lexicon, load_lexicon
from deployments.prompt.parser import parse_instruction
from deployments.prompt.settings import DEFAULT_STYLE
from deployments.text_encoder.block_pool import hash_block
from deployments.text_encoder.settings import DEFAULT_BLOCK_SIZE

CLIP_WINDOW = builder.CLIP_MAX_LENGTH  # positions CLIP sees, BOS and EOS included
CONTENT_TOKENS = CLIP_WINDOW - 2
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class OptimizedPrompt:
    prompt: str
    negative_prompt: str
    prompt_tokens: int  # CLIP tokens of `prompt`, BOS/EOS excluded, before truncation
    negative_prompt_tokens: int
    truncated_tokens: int  # prompt tokens that fall outside the 77-token window
    cache_namespace: str
    original_tokens: int = 0  # CLIP tokens of the instruction as the user wrote it
    prefix_tokens: int = 1  # leading positions (BOS included) identical for the whole namespace
    # Of prompt_tokens, the namespace template's (its comma included): the server's, not the user's text
    template_tokens: int = 0
    attributes: Attributes = field(default_factory=dict)  # key -> values (identity included)
    warnings: tuple[str, ...] = ()
    # Names the prompt's first window block in its namespace: the text encoder's router sends
    # equal keys to the same replica, whose prefix cache holds that block.
    routing_key: str = ""

    def attribute_text(self) -> dict[str, str | list[str]]:
        """The attributes as `/v1/prompts/optimize` shows them: each key's values as the prompt
        says them ("outdoors, blurred background"), accessories as a list."""
        return attribute_values.as_text(self.attributes)

    def user_tokens(self) -> int:
        """prompt_tokens without the namespace template: what the user's prompt became."""
        return self.prompt_tokens - self.template_tokens

    def saved_fraction(self) -> float:
        """1 - user_tokens / original_tokens: the template is not the optimizer's cost."""
        return round(1 - self.user_tokens() / self.original_tokens, 4) if self.original_tokens else 0.0

    def attribute_count(self) -> int:
        """Terms the attributes add to the prompt: one per key, each accessory apart."""
        return len(attribute_values.terms(self.attributes))


def normalize_whitespace(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def _render_age(text: str) -> str:
    text = text.strip()
    return f"age:{text}" if text.isdigit() else text


def optimize_prompt(
    base_identity: str | None,
    target_attributes: Mapping[str, Sequence[str]],
    style_hint: str | None = DEFAULT_STYLE,
    quality: Sequence[str] = (),
    extra: Sequence[str] = (),
    template: str = "",
    lexicon: Lexicon | None = None,
) -> str:
    """Structured builder: fixed key order, no duplicates, whitespace normalised.

    `target_attributes`: key -> values. Keys: age ("35" or "age:35" or a word), expression
    (omitted when neutral), glasses, gender, hair, facial_hair, view (or pose), lighting,
    background, accessories. `gender` is used only when `base_identity` lacks it.
    """
    lexicon = lexicon or load_lexicon()
    attributes = dict(target_attributes)
    if "pose" in attributes and "view" not in attributes:
        attributes["view"] = attributes.pop("pose")
    identity = normalize_whitespace(base_identity or "")
    gender = attribute_values.term("gender", attributes.pop("gender", []))
    if gender and gender.lower() not in identity.lower().split():
        identity = normalize_whitespace(f"{identity} {gender}")
    terms = [normalize_whitespace(template)] if template else []
    terms.append(identity)
    for key in lexicon.key_order[1:]:
        values = attributes.get(key)
        if not values:
            continue
        text = attribute_values.term(key, values)
        if key == "age":
            terms.append(_render_age(text))
        elif key == "expression":
            text = text.strip()
            if text.lower() not in ("neutral", "neutral expression"):
                terms.append(text if text.lower().endswith("expression") else f"{text} expression")
        elif key == attribute_values.ACCESSORIES:
            terms.extend(values)
        else:
            terms.append(text)
    terms += list(extra)
    if style_hint:
        terms.append(style_hint)
    terms += list(quality)
    return _join_unique(terms)


def _join_unique(terms: list[str]) -> str:
    """Comma-join, dropping empty terms and any term already said (the template's own terms
    included). Whole terms only: "Black" is not said by "short black hair"."""
    seen: list[str] = []
    said: set[str] = set()
    for term in (normalize_whitespace(t) for t in terms):
        parts = {p.strip().lower() for p in term.split(",")}
        if term and not parts <= said:
            seen.append(term)
            said |= parts
    return ", ".join(seen)


def negative_terms(negated: list[str]) -> list[str]:
    """What the instruction asked away, as negative-prompt terms: 'no smile' -> smiling,
    'without glasses' -> glasses (the canonical value without its 'wearing'/'expression')."""
    return [value.removeprefix("wearing ").removesuffix(" expression") for value in negated]


def merge_negative_prompt(user_negative: str, defaults: Sequence[str], asked_away: Sequence[str] = ()) -> str:
    """The default negative terms first (stable, so the encoder's exact cache hits), then
    what the instruction asked away, then the user's own, deduplicated case-insensitively."""
    terms = [*defaults, *asked_away, *re.split(r"[,\n]", user_negative)]
    unique = dict.fromkeys(normalize_whitespace(t) for t in terms)
    kept, seen = [], set()
    for term in unique:
        if term and term.lower() not in seen:
            seen.add(term.lower())
            kept.append(term)
    return ", ".join(kept)


def routing_key_for(window_ids: Sequence[int], namespace: str) -> str:
    """Names the first block (the text encoder's default block size) of a padded window in
    its namespace (hex)."""
    return hash_block(None, window_ids[:DEFAULT_BLOCK_SIZE], (namespace,)).hex()


class PromptOptimizerEngine:
    def __init__(
        self,
        model_path: Path,
        templates: dict[str, str] | None = None,
        default_style: str = DEFAULT_STYLE,
        lexicon: Lexicon | None = None,
    ):
        self.tokenizer = loading.load_tokenizer(Path(model_path))
        # The fast tokenizer keeps padding/truncation settings as state between calls, and
        # Serve runs this sync stage on a thread pool: one call at a time.
        self._lock = threading.RLock()
        self.templates = dict(templates or {})
        self.default_style = default_style
        self.lexicon = lexicon or load_lexicon()

    def routing_key(self, text: str, namespace: str) -> str:
        with self._lock:
            window = self.tokenizer(text, padding="max_length", max_length=CLIP_WINDOW, truncation=True).input_ids
        return routing_key_for(window, namespace)

    def count_tokens(self, text: str) -> int:
        if not text:
            return 0
        with self._lock:
            return len(self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids)

    def optimize(
        self, prompt: str, negative_prompt: str = "", cache_namespace: str = "default", enabled: bool = True
    ) -> OptimizedPrompt:
        with self._lock:  # the whole decision sees one consistent tokenizer
            return self._optimize(prompt, negative_prompt, cache_namespace, enabled)

    def _optimize(self, prompt: str, negative_prompt: str, cache_namespace: str, enabled: bool) -> OptimizedPrompt:
        original = normalize_whitespace(prompt)
        original_tokens = self.count_tokens(original)
        if not enabled:
            negative = normalize_whitespace(negative_prompt)
            return self._result(original, negative, original_tokens, cache_namespace, {}, [])
        template = self.templates.get(cache_namespace, "")
        parsed = parse_instruction(original, self.lexicon)
        warnings = list(parsed.warnings)
        if parsed.identity is None and not parsed.attributes and not parsed.extra:
            asked_away = negative_terms(parsed.negated)
            negative = merge_negative_prompt(negative_prompt, self.lexicon.negative_default, asked_away)
            if asked_away:
                # "no glasses" as written would put glasses in front of CLIP: what is asked away
                # goes to the negative prompt only, the prompt keeps the style and quality asked for.
                warnings.append(
                    f"the prompt only asks things away ({', '.join(asked_away)}): they are in the "
                    "negative prompt; the prompt is the style alone"
                )
                text = _join_unique([template, parsed.style or self.default_style, *parsed.quality])
            else:
                # Nothing but filler words ("a portrait, please"): still a valid prompt, as written.
                warnings.append("nothing to optimize: the prompt is all filler words; used as written")
                text = _join_unique([template, original]) if template else original
            return self._result(text, negative, original_tokens, cache_namespace, {}, warnings, template)
        attributes = (
            {"identity": [parsed.identity], **parsed.attributes} if parsed.identity else dict(parsed.attributes)
        )
        style: str | None = parsed.style or self.default_style
        quality, extra = list(parsed.quality), list(parsed.extra)

        def build(style_hint: str | None) -> str:
            return optimize_prompt(
                parsed.identity, parsed.attributes, style_hint, quality, extra, template, self.lexicon
            )

        text = build(style)
        # An already compact prompt is never made longer (the namespace template aside):
        # first drop a style the user did not ask for; if the user's text already says
        # every attribute, keep it as written. A verbose one keeps the structured form.
        template_tokens = self.count_tokens(template + ",") if template else 0
        if self.count_tokens(text) - template_tokens > original_tokens and not parsed.style:
            style = None
            text = build(None)
        # every value must be in the text, as the prompt words it (facial hair: "beard and mustache")
        values = [phrase for key, values in attributes.items() for phrase in attribute_values.phrases(key, values)]
        already_compact = all(
            re.search(rf"(?<![\w-]){re.escape(v)}(?![\w-])", original, re.IGNORECASE) for v in values
        )  # whole words: "man" is not said by "fisherman"
        structured_tokens = self.count_tokens(text) - template_tokens
        if structured_tokens > original_tokens and already_compact:
            warnings.append(
                f"kept as written: the structured form ({structured_tokens} tokens) is longer than "
                f"the prompt ({original_tokens})"
            )
            text = _join_unique([template, original]) if template else original
        else:
            # The 77-token window: drop the lowest-value terms first, never identity or attributes,
            # and never the last piece of content (CLIP then truncates it, with a warning).
            keep_one = 0 if (parsed.identity or parsed.attributes) else 1
            while self.count_tokens(text) > CONTENT_TOKENS and (quality or style or len(extra) > keep_one):
                if quality:
                    warnings.append(f"dropped quality term {quality.pop()!r} to fit CLIP's 77-token window")
                elif style:
                    warnings.append(f"dropped style {style!r} to fit CLIP's 77-token window")
                    style = None
                else:
                    warnings.append(f"dropped {extra.pop()!r} to fit CLIP's 77-token window")
                text = build(style)
        negative = merge_negative_prompt(negative_prompt, self.lexicon.negative_default, negative_terms(parsed.negated))
        return self._result(text, negative, original_tokens, cache_namespace, attributes, warnings, template)

    def _result(
        self,
        text: str,
        negative: str,
        original_tokens: int,
        namespace: str,
        attributes: Attributes,
        warnings: list[str],
        template: str = "",
    ) -> OptimizedPrompt:
        tokens = self.count_tokens(text)
        template_tokens = self.count_tokens(template + ",") if template and text.startswith(template) else 0
        if tokens > CONTENT_TOKENS:
            warnings = [*warnings, f"the prompt is {tokens} tokens; CLIP reads the first {CONTENT_TOKENS}"]
        return OptimizedPrompt(
            prompt=text,
            negative_prompt=negative,
            prompt_tokens=tokens,
            negative_prompt_tokens=self.count_tokens(negative),
            truncated_tokens=max(0, tokens - CONTENT_TOKENS),
            cache_namespace=namespace,
            original_tokens=original_tokens,
            prefix_tokens=1 + template_tokens,
            template_tokens=template_tokens,
            attributes=attributes,
            warnings=tuple(warnings),
            routing_key=self.routing_key(text, namespace),
        )
