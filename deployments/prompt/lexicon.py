"""The prompt optimizer's rules, loaded from `data/lexicon.yaml` and compiled once.

Patterns are data (one YAML file); this module only turns them into regular expressions.
English patterns get word boundaries; Chinese ones match as substrings (no spaces).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import yaml

LEXICON_FILE = Path(str(resources.files("deployments.prompt") / "data" / "lexicon.yaml"))


class Matcher(Protocol):
    """What the parser asks of a rule: a compiled `re.Pattern[str]` or a `LongestMatch`."""

    def search(self, text: str, pos: int = 0, /) -> re.Match[str] | None: ...

    def fullmatch(self, text: str, /) -> re.Match[str] | None: ...

    def subn(self, replacement: str, text: str, /) -> tuple[str, int]: ...


def _english(patterns: list[str]) -> re.Pattern[str]:
    return re.compile(r"(?<![\w-])(?:" + "|".join(patterns) + r")(?![\w-])", re.IGNORECASE)


def _chinese(patterns: list[str]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(p) for p in patterns))


@dataclass(frozen=True)
class Lexicon:
    key_order: tuple[str, ...]
    ethnicity: dict[str, LongestMatch]
    gender: dict[str, LongestMatch]
    pronouns: dict[str, LongestMatch]
    ethnicity_in_context: dict[str, re.Pattern[str]]  # ethnicity -> the word where it names a person
    ethnicity_context: re.Pattern[str]  # "(of) descent/origin/...", consumed with the ethnicity
    gendered_roles: dict[str, re.Pattern[str]]  # gender -> roles that tell it and stay as content ("bride")
    gendered_ethnicity: dict[str, str]  # "latina" -> woman: the word names a person and tells the gender
    age_words: dict[str, int]
    age_groups: re.Pattern[str]
    number_words: dict[str, int]  # "six" -> 6, "forty" -> 40: ages written in words
    number_word: re.Pattern[str]  # one number in words: "six", "forty-two", "thirty five"
    age_nouns: dict[str, re.Pattern[str]]  # age group -> person nouns that tell it ("teenager")
    bare_age: re.Pattern[str]  # a number on its own right after a person noun; group 1
    adult_age: int  # from this age a boy is a man; under it a man is a boy
    minor_age_groups: tuple[str, ...]  # age words that make a man a boy ("teenage")
    adult_of: dict[str, str]  # youth noun -> adult noun (boy -> man)
    attributes: dict[str, dict[str, LongestMatch]]  # key -> canonical value -> its patterns
    implied: dict[str, dict[str, LongestMatch]]  # key -> value -> pattern, used only when the key has no value
    hair_nouns: dict[str, LongestMatch]
    # "<up to 5 words> <noun>": group 1 the words, group 2 the noun (hair, haircut, braids, bob, ...)
    hair_phrase: re.Pattern[str]
    hair_nouns_alone: frozenset[str]  # nouns that name the hair with no hair word before them
    hair_colors: dict[str, LongestMatch]
    hair_styles: dict[str, LongestMatch]
    hair_style_words: frozenset[str]  # the words of two-word styles: "shoulder", "length" of shoulder length
    hair_shades: re.Pattern[str]
    accessories: dict[str, LongestMatch]  # group 1: the colour/material/size words before the accessory, if any
    # key -> value -> patterns whose group 1 is the modifier words kept with the value:
    # "soft studio light", "round glasses", "neatly trimmed gray beard" (`<key>_modifiers` in the YAML)
    modified: dict[str, dict[str, LongestMatch]]
    styles: dict[str, LongestMatch]
    quality: dict[str, LongestMatch]
    quality_groups: tuple[tuple[str, ...], ...]  # synonyms: only the first one asked for is kept
    filler: re.Pattern[str]
    noise: re.Pattern[str]  # filler and intensifiers in one pattern, longest first ("good morning" before "good")
    negative_default: tuple[str, ...]
    zh_identity: dict[str, LongestMatch]
    zh_gender: dict[str, LongestMatch]
    zh_age: re.Pattern[str]
    zh_hair_compound: tuple[re.Pattern[str], str]  # colour+style hair words -> two hair words
    zh_attributes: dict[str, dict[str, LongestMatch]]
    zh_styles: dict[str, LongestMatch]
    zh_quality: dict[str, LongestMatch]
    zh_filler: re.Pattern[str]


class LongestMatch:
    """Alternative patterns where, at the leftmost position any of them matches, the longest
    match wins — whatever order they are listed in (re's `a|b` takes the first that matches,
    so 'outdoors?' would leave the "background" of "outdoor background" behind). Offers the
    `re.Pattern` methods the parser uses (see `Matcher`)."""

    def __init__(self, alternatives: list[re.Pattern[str]]):
        self.alternatives = alternatives

    def search(self, text: str, pos: int = 0) -> re.Match[str] | None:
        best: re.Match[str] | None = None
        for alternative in self.alternatives:
            match = alternative.search(text, pos)
            if match and (best is None or (match.start(), -match.end()) < (best.start(), -best.end())):
                best = match
        return best

    def fullmatch(self, text: str) -> re.Match[str] | None:
        return next((m for a in self.alternatives if (m := a.fullmatch(text))), None)

    def subn(self, replacement: str, text: str) -> tuple[str, int]:
        parts: list[str] = []
        count, pos = 0, 0
        while (match := self.search(text, pos)) is not None and match.end() > match.start():
            parts += [text[pos : match.start()], replacement]
            pos, count = match.end(), count + 1
        return "".join(parts) + text[pos:], count


def _compile_group(
    group: dict[str, list[str]], compile_patterns: Callable[[list[str]], re.Pattern[str]], canonical: bool = False
) -> dict[str, LongestMatch]:
    """value -> its patterns, longest match first. With `canonical`, the value's own text
    matches too, so an already structured prompt ("smiling expression") parses to itself."""
    compiled = {}
    for value, patterns in group.items():
        alternatives = list(patterns) + ([re.escape(value)] if canonical else [])
        if alternatives:
            compiled[value] = LongestMatch([compile_patterns([a]) for a in alternatives])
    return compiled


def _person_nouns(data: dict[str, Any]) -> str:
    """Every person noun of the lexicon as one alternation, for patterns that need one nearby."""
    return "|".join(_english(words).pattern for words in data["gender"].values())


def _ethnicity_in_context(data: dict[str, Any]) -> dict[str, re.Pattern[str]]:
    """An ethnicity word counts only before a person noun ("Asian man", "Asian, smiling
    woman"), with a context word ("of Asian descent"), or as a phrase of its own
    ("female software engineer, Asian, ..."): "black suit" is not one."""
    roles = [n for names in data["gendered_roles"].values() for n in names]
    others = _words([*data["occupation_nouns"], *roles]).pattern
    nouns = "|".join([_person_nouns(data), others])
    context = "|".join(data["ethnicity_context"])
    gendered = {w for words in data.get("gendered_ethnicity", {}).values() for w in words}
    # "Nigerian-American", "Korean-Canadian": the first word names the ethnicity
    suffix = rf"(?:-(?:{'|'.join(data['ethnicity_suffixes'])}))?"
    patterns = {}
    for name, words in data["ethnicity"].items():
        word = _english([rf"(?:{'|'.join(words)}){suffix}"]).pattern
        # "a Latina with curly hair": a gendered ethnicity word names a person by itself
        own = [w for w in words if w in gendered]
        alone = rf"|{_words(own).pattern}" if own else ""
        patterns[name] = re.compile(
            rf"(?:{word})(?=(?:[\s,]+[\w-]+){{0,2}}?[\s,]+(?:{nouns}|{context})(?![\w-]))"
            rf"|(?:^|,)\s*(?:{word})\s*(?=,|$){alone}",
            re.IGNORECASE,
        )
    return patterns


def _with_modifiers(group: dict[str, list[str]], modifiers: list[str], skip_one_word: bool) -> dict[str, LongestMatch]:
    """Patterns with an optional run of modifier words first, captured as group 1: 'little gold
    (hoop) earrings', 'neatly trimmed gray beard'. `skip_one_word` allows one unknown word
    between the run and the noun (the 'hoop' of hoop earrings). Longest match wins, as in
    `_compile_group` ("golden hour light" is not "golden hour" + a leftover "light")."""
    lead = "|".join(re.escape(m) for m in modifiers)
    gap = r"(?:[a-z]+\s+)?" if skip_one_word else ""
    return {
        value: LongestMatch(
            [
                re.compile(rf"(?<![\w-])(?:((?:(?:{lead})\s+)+){gap})?(?:{alternative})(?![\w-])", re.IGNORECASE)
                for alternative in [re.escape(value), *patterns]
            ]
        )
        for value, patterns in group.items()
    }


def _hair_phrase(nouns: dict[str, list[str]]) -> re.Pattern[str]:
    """Up to five words (group 1) before the hair's noun (group 2): "hair", "haircut", or a
    noun that names the hair itself ("braids", "bob")."""
    words = sorted((*nouns["alone"], *nouns["after_a_hair_word"]), key=len, reverse=True)
    noun = "|".join([r"hair(?:\s*styles?|cut)?", *(re.escape(w) for w in words)])
    return re.compile(rf"((?:[a-z][\w-]*[\s,]+){{0,5}})({noun})(?!\w)", re.IGNORECASE)


def _number_word(numbers: dict[str, int]) -> re.Pattern[str]:
    """A number in words up to ninety-nine: tens with an optional unit ("forty-two"), or one word."""
    tens = "|".join(w for w, n in numbers.items() if n >= 20 and n % 10 == 0)
    units = "|".join(w for w, n in numbers.items() if n < 10)
    words = "|".join(sorted(numbers, key=len, reverse=True))
    return re.compile(rf"(?<![\w-])(?:(?:{tens})[\s-](?:{units})|{words})(?!\w|-(?!ish|years?|yrs?))", re.IGNORECASE)


def _bare_age(data: dict[str, Any]) -> re.Pattern[str]:
    """'woman, 34, with ...': a 1-3 digit number set off by commas right after a person noun."""
    nouns = _person_nouns(data)
    return re.compile(rf"(?:{nouns})\s*,\s*(\d{{1,3}})(?=\s*(?:[,.;]|$))", re.IGNORECASE)


def _words(words: list[Any]) -> re.Pattern[str]:
    """Words and phrases, longest first: 'on the face' goes whole, not as 'on' + 'the' + 'face'."""
    return _english([re.escape(str(word)) for word in sorted(words, key=lambda w: -len(str(w)))])


def _with_nouns(
    group: dict[str, list[str]], nouns: Sequence[str], suffixes: Sequence[str] = ()
) -> dict[str, list[str]]:
    """Each pattern may be followed by one of `nouns` or `suffixes`: 'serious face', 'stern look',
    'serious-looking' -> serious."""
    if not nouns and not suffixes:
        return group
    endings = [rf"\s+(?:{'|'.join(re.escape(n) for n in nouns)})"] if nouns else []
    endings += [re.escape(suffix) for suffix in suffixes]
    tail = rf"(?:{'|'.join(endings)})?"
    return {value: [f"(?:{p}){tail}" for p in patterns] for value, patterns in group.items()}


@functools.lru_cache(maxsize=4)
def load_lexicon(path: Path = LEXICON_FILE) -> Lexicon:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    zh = data["chinese"]
    return Lexicon(
        key_order=tuple(data["key_order"]),
        ethnicity=_compile_group(data["ethnicity"], _english),
        gender=_compile_group(data["gender"], _english),
        pronouns=_compile_group(data["pronouns"], _english),
        ethnicity_in_context=_ethnicity_in_context(data),
        gendered_roles={gender: _words(names) for gender, names in data["gendered_roles"].items()},
        gendered_ethnicity={w: gender for gender, words in data.get("gendered_ethnicity", {}).items() for w in words},
        ethnicity_context=re.compile(
            rf"(?<!\w)(?:of\s+)?(?:{'|'.join(data['ethnicity_context'])})(?!\w)", re.IGNORECASE
        ),
        age_words=dict(data["age_words"]),
        age_groups=_english([re.escape(word) for word in data["age_groups"]]),
        number_words={str(word): int(n) for word, n in data["number_words"].items()},
        number_word=_number_word(data["number_words"]),
        age_nouns={
            age: _english([re.escape(n) for n, a in data.get("age_nouns", {}).items() if a == age])
            for age in set(data.get("age_nouns", {}).values())
        },
        bare_age=_bare_age(data),
        adult_age=int(data["youth"]["adult_age"]),
        minor_age_groups=tuple(data["youth"]["minor_age_groups"]),
        adult_of=dict(data["youth"]["adult_of"]),
        attributes={
            key: _compile_group(
                _with_nouns(values, data.get(f"{key}_nouns", ()), data.get(f"{key}_suffixes", ())),
                _english,
                canonical=True,
            )
            for key, values in data["attributes"].items()
        },
        implied={key: _compile_group(values, _english) for key, values in data.get("implied", {}).items()},
        hair_nouns=_compile_group(data["hair_nouns"], _english),
        hair_phrase=_hair_phrase(data["hair_phrase_nouns"]),
        hair_nouns_alone=frozenset(data["hair_phrase_nouns"]["alone"]),
        hair_colors=_compile_group(data["hair_colors"], _english),
        hair_styles=_compile_group(data["hair_styles"], _english),
        hair_style_words=frozenset(w for style in data["hair_styles"] if " " in style for w in style.split()),
        hair_shades=_english([re.escape(word) for word in data["hair_shades"]]),
        accessories=_with_modifiers(data["attributes"]["accessories"], data["accessory_modifiers"], skip_one_word=True),
        modified={
            key: _with_modifiers(values, data[f"{key}_modifiers"], skip_one_word=False)
            for key, values in data["attributes"].items()
            if f"{key}_modifiers" in data
        },
        styles=_compile_group(data["styles"], _english, canonical=True),
        quality=_compile_group(data["quality"], _english, canonical=True),
        quality_groups=tuple(tuple(group) for group in data.get("quality_groups", ())),
        filler=_words(data["filler"]),
        noise=_words(data["filler"] + data["intensifiers"]),
        negative_default=tuple(data["negative_default"]),
        zh_identity=_compile_group(zh["identity"], _chinese),
        zh_gender=_compile_group(zh["gender"], _chinese),
        zh_age=re.compile(zh["age_pattern"]),
        zh_hair_compound=(re.compile(zh["hair_compound"][0]), zh["hair_compound"][1]),
        zh_attributes={key: _compile_group(values, _chinese) for key, values in zh["attributes"].items()},
        zh_styles=_compile_group(zh["styles"], _chinese),
        zh_quality=_compile_group(zh["quality"], _chinese),
        zh_filler=_chinese(zh["filler"]),
    )
