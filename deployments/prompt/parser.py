"""Free-text portrait instructions (English and Chinese) -> structured attributes.

Rule- and lexicon-based (`data/lexicon.yaml`), no model calls. Every span the
rules understand is consumed; what is left after dropping filler and intensifiers is
kept as extra phrases (English) or reported as a warning (Chinese, which CLIP cannot
read), so nothing is dropped silently.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from deployments.prompt import attributes as attribute_values
from deployments.prompt.attributes import Attributes
from deployments.prompt.lexicon import Lexicon, Matcher

# Age grammar: number forms ("35 years old", "35-year-old", "aged 35", "age: 35", "around 35") and
# decades ("in his thirties", "in her 40s"). Vague ages come from the lexicon's age_groups.
HEDGES = "around|about|roughly|approximately|circa|maybe|perhaps|probably|like"  # before an age: "maybe 70"
AGE_NUMBER = [
    re.compile(r"(?<!\w)(?:age|aged)\s*[:=]?\s*(\d{1,3})(?!\d)", re.IGNORECASE),
    re.compile(r"(?<!\d)(\d{1,3})\s*-?\s*(?:years?|yrs?|yo)(?:\s*-?\s*old)?(?!\w)", re.IGNORECASE),
    re.compile(r"(?<![\w.])(\d{1,3})-?ish(?!\w)", re.IGNORECASE),  # "45ish", "30-ish"
    # "around 25", "roughly 40": a hedged bare number, unless a unit follows ("about 85mm")
    re.compile(
        rf"(?<!\w)(?:{HEDGES})\s+(\d{{1,3}})(?![\d.,]?\d|\s*(?:%|mm|cm|px|k\b|x\b|"
        r"°|degrees?|percent|inch|in\b|fps|steps?|people|persons|men|women))",
        re.IGNORECASE,
    ),
]
# a decade after "in his", after early/mid/late, or as a phrase of its own ("Caucasian female, 50s, ...")
AGE_DECADE = re.compile(
    r"(?:in\s+(?:his|her|their)\s+(?:early\s+|mid\s+|mid-|late\s+)?|(?<!\w)(?:early|mid|late)[\s-]+"
    r"|(?:^|(?<=[,:]))\s*(?=[\w']+\s*(?:[,.;]|$)))(\d0'?s|[a-z]+)(?!\w)",
    re.IGNORECASE,
)
AGE_PHRASE = re.compile(r"(?:^|,)\s*(\d{1,3})\s*(?=,|$)")
# where a number written in words is an age: "around six", "aged forty-two", "six years old"
AGE_WORD_BEFORE = re.compile(rf"(?<!\w)(?:(?:age|aged)\s*[:=]?|{HEDGES})\s+$", re.IGNORECASE)
AGE_WORD_AFTER = re.compile(r"^(?:\s*-?\s*(?:years?|yrs?|yo)|-?ish)(?!\w)", re.IGNORECASE)
CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
PHRASE_BREAK = re.compile(r"[,.;:!?\n/|()\[\]\"]+|\s-\s")
CONSUMED = " , "  # what a consumed span becomes: keeps phrase boundaries
NEGATION = re.compile(
    r"(?<![\w-])(?:no|not|without|never|isn't|aren't|doesn't|don't)\s+(?:a\s+|an\s+|any\s+|wearing\s+)?$", re.IGNORECASE
)
ZH_NEGATION = re.compile(r"(?:不要|不|没有|没|无|别)$")


@dataclass
class ParsedInstruction:
    identity: str | None = None
    attributes: Attributes = field(default_factory=dict)  # key -> canonical values, as named
    style: str | None = None
    quality: list[str] = field(default_factory=list)  # canonical terms, in first-seen order
    extra: list[str] = field(default_factory=list)  # English content the rules did not understand
    negated: list[str] = field(default_factory=list)  # values asked away ("no smile", "without glasses")
    warnings: list[str] = field(default_factory=list)


class _Text:
    """The instruction with consumed spans blanked out."""

    def __init__(self, text: str):
        self.text = text

    def take(self, pattern: Matcher) -> re.Match[str] | None:
        match = pattern.search(self.text)
        if match:
            self.replace(match)
        return match

    def negation_before(self, position: int) -> re.Match[str] | None:
        """'no ', 'not ', 'without (a) ' (or 不, 没有, 无) ending right at `position`."""
        before = self.text[:position]
        return NEGATION.search(before) or ZH_NEGATION.search(before)

    def replace(self, match: re.Match[str], replacement: str = CONSUMED) -> None:
        self.cut(match.start(), match.end(), replacement)

    def cut(self, start: int, end: int, replacement: str = CONSUMED) -> None:
        self.text = self.text[:start] + replacement + self.text[end:]

    def take_all(self, pattern: Matcher) -> int:
        self.text, count = pattern.subn(CONSUMED, self.text)
        return count


def parse_instruction(text: str, lexicon: Lexicon) -> ParsedInstruction:
    parsed = ParsedInstruction()
    work = _Text(text)
    if CJK.search(text):
        _parse_chinese(work, lexicon, parsed)
    _parse_age(work, lexicon, parsed)
    _parse_attributes(work, lexicon, parsed)
    for term, pattern in lexicon.quality.items():  # before styles: "realistic skin" is quality
        if work.take_all(pattern) and term not in parsed.quality:
            parsed.quality.append(term)
    for style, pattern in lexicon.styles.items():
        if work.take_all(pattern) and parsed.style is None:
            parsed.style = style
    _parse_identity(work, lexicon, parsed)
    _match_identity_to_age(parsed, lexicon)
    _collect_leftovers(work, lexicon, parsed)
    parsed.quality = collapse_synonyms(parsed.quality, lexicon.quality_groups)
    return parsed


def collapse_synonyms(terms: list[str], groups: tuple[tuple[str, ...], ...]) -> list[str]:
    """One term per synonym group: the first the group lists, kept where the instruction first
    asked for any of them ("8k, highly detailed" -> highly detailed)."""
    kept: list[str] = []
    for term in terms:
        group = next((g for g in groups if term in g), None)
        if group is None:
            kept.append(term)
            continue
        best = next(t for t in group if t in terms)
        if best not in kept:
            kept.append(best)
    return kept


def _add(parsed: ParsedInstruction, key: str, values: list[str]) -> None:
    """Every value the instruction names for `key` is kept, in its order ("outdoors, blurred
    background" -> 'outdoor background', 'blurred background'), none twice; neutral only alone."""
    merged = list(dict.fromkeys([*parsed.attributes.get(key, []), *values]))
    if key == "expression" and len(merged) > 1:
        merged = [v for v in merged if v != "neutral"]
    if merged:
        parsed.attributes[key] = merged


def _take_values(
    work: _Text, values: Mapping[str, Matcher], parsed: ParsedInstruction, modified: bool = False
) -> list[str]:
    """The values whose patterns match, in the order the instruction names them (spans consumed).
    A value right after a negation ("no smile", "without glasses") goes to `parsed.negated`
    instead. `modified`: the pattern captures modifier words first (accessories, facial hair)."""
    found = []
    for value, pattern in values.items():
        while match := pattern.search(work.text):
            negation = work.negation_before(match.start())
            start = negation.start() if negation else match.start()
            work.cut(start, match.end())
            text = _modified(match, value) if modified else value
            if negation:
                parsed.negated.append(value)
            else:
                found.append((start, text))
    return list(dict.fromkeys(value for _, value in sorted(found)))


def _parse_chinese(work: _Text, lexicon: Lexicon, parsed: ParsedInstruction) -> None:
    compound, split = lexicon.zh_hair_compound
    work.text = compound.sub(split, work.text)
    match = work.take(lexicon.zh_age)
    if match:
        number = zh_number(match.group(1) or match.group(3))
        if match.group(2) or match.group(4):  # 四十多岁: in the forties -> the middle of them
            number += 5 if number % 10 == 0 and number >= 10 else 0
        if 0 < number < 130:
            parsed.attributes["age"] = [f"age:{number}"]
    for key, values in lexicon.zh_attributes.items():
        found = _take_values(work, values, parsed)
        if key == "hair":
            found = _merge_zh_hair(found, lexicon)
        if key == attribute_values.FACIAL_HAIR and found:  # as the English kinds: beard and mustache
            parsed.attributes.setdefault(key, found)
        else:
            _add(parsed, key, found)
    for style, pattern in lexicon.zh_styles.items():
        if work.take_all(pattern) and parsed.style is None:
            parsed.style = style
    for term, pattern in lexicon.zh_quality.items():
        if work.take_all(pattern) and term not in parsed.quality:
            parsed.quality.append(term)
    ethnicity = next((e for e, p in lexicon.zh_identity.items() if work.take_all(p)), None)
    gender = next((g for g, p in lexicon.zh_gender.items() if work.take_all(p)), None)
    if gender:
        parsed.identity = f"{ethnicity} {gender}" if ethnicity else gender
    work.take_all(lexicon.zh_filler)
    unknown = "".join(CJK.findall(work.text))
    if unknown:
        parsed.warnings.append(f"untranslated Chinese text left out of the prompt: {unknown}")
    work.text = CJK.sub(" ", work.text)


ZH_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
ZH_UNITS = {"十": 10, "百": 100}


def zh_number(text: str) -> int:
    """Digits or Chinese numerals up to the hundreds: 35, 三十五, 十八, 一百零五."""
    if text.isdigit():
        return int(text)
    total = current = 0
    for char in text:
        if char in ZH_UNITS:
            total += (current or 1) * ZH_UNITS[char]
            current = 0
        elif char in ZH_DIGITS:
            current = ZH_DIGITS[char]
        elif char.isdigit():
            current = current * 10 + int(char)
    return total + current


def _merge_zh_hair(values: list[str], lexicon: Lexicon) -> list[str]:
    """长发 + 黑发 -> 'long black hair': style words first, in the English order, then colours."""
    words = [w for v in values if v != "bald" for w in v.removesuffix(" hair").split()]
    styles = [s for s in lexicon.hair_styles if s in words]
    colors = [w for w in dict.fromkeys(words) if w not in styles]
    merged = [" ".join(styles + colors) + " hair"] if words else []
    return merged + (["bald"] if "bald" in values else [])


def _age_words_as_digits(work: _Text, lexicon: Lexicon) -> None:
    """'a girl around six' -> 'a girl around 6': number words become digits where they say an
    age, so the number patterns read them; 'one earring' stays as written."""
    for match in reversed(list(lexicon.number_word.finditer(work.text))):
        if AGE_WORD_BEFORE.search(work.text[: match.start()]) or AGE_WORD_AFTER.match(work.text[match.end() :]):
            value = sum(lexicon.number_words[w.lower()] for w in re.split(r"[\s-]+", match.group(0)))
            work.cut(match.start(), match.end(), str(value))


def _parse_age(work: _Text, lexicon: Lexicon, parsed: ParsedInstruction) -> None:
    if "age" in parsed.attributes:
        return
    _age_words_as_digits(work, lexicon)
    for pattern in AGE_NUMBER:
        match = work.take(pattern)
        if match and 0 < int(match.group(1)) < 130:
            parsed.attributes["age"] = [f"age:{int(match.group(1))}"]
            work.take_all(lexicon.age_groups)  # "a young 25-year-old": the number says it
            return
    for match in AGE_DECADE.finditer(work.text):
        word = match.group(1).lower()
        decade = lexicon.age_words.get(word)
        if decade is None and word[:2].isdigit():
            decade = int(word[:2]) + 5  # "in her 40s" -> 45
        if decade:
            work.replace(match)
            parsed.attributes["age"] = [f"age:{decade}"]
            work.take_all(lexicon.age_groups)
            return
    # "a Nigerian woman, 34, with braided hair", else a number that is a phrase of its own
    # ("a man with a gray beard, 55, wearing ...")
    match = lexicon.bare_age.search(work.text) or AGE_PHRASE.search(work.text)
    if match and 0 < int(match.group(1)) < 130:
        parsed.attributes["age"] = [f"age:{int(match.group(1))}"]
        work.cut(match.start(1), match.end(1))
        work.take_all(lexicon.age_groups)
        return
    match = work.take(lexicon.age_groups)
    if match:
        parsed.attributes["age"] = [match.group(0).lower()]
        return
    noun = next((age for age, pattern in lexicon.age_nouns.items() if pattern.search(work.text)), None)
    if noun:  # "a Black teenager": the noun stays for the identity
        parsed.attributes["age"] = [noun]


def _parse_attributes(work: _Text, lexicon: Lexicon, parsed: ParsedInstruction) -> None:
    for key, values in lexicon.attributes.items():
        if key == "hair":
            _parse_hair(work, lexicon, parsed)
        if key == "accessories":
            _parse_accessories(work, lexicon, parsed)
            continue
        if key == "facial_hair":
            _parse_facial_hair(work, lexicon, parsed)
            continue
        # with its modifier words: "soft natural light" -> soft natural lighting
        modified = key in lexicon.modified
        _add(parsed, key, _take_values(work, lexicon.modified.get(key, values), parsed, modified=modified))
        implied = _take_values(work, lexicon.implied.get(key, {}), parsed)
        if key not in parsed.attributes:
            _add(parsed, key, implied)


def _parse_accessories(work: _Text, lexicon: Lexicon, parsed: ParsedInstruction) -> None:
    _add(parsed, attribute_values.ACCESSORIES, _take_values(work, lexicon.accessories, parsed, modified=True))


def _parse_facial_hair(work: _Text, lexicon: Lexicon, parsed: ParsedInstruction) -> None:
    """Every kind named ("a beard and a mustache" -> beard and mustache), each with its colour
    and grooming words ("neatly trimmed gray beard")."""
    found = _take_values(work, lexicon.modified["facial_hair"], parsed, modified=True)
    # "a bearded man with a thick black beard": beard is said by thick black beard
    found = [v for v in found if not any(set(v.split()) < set(other.split()) for other in found)]
    if found:
        parsed.attributes.setdefault(attribute_values.FACIAL_HAIR, found)


def _modified(match: re.Match[str], value: str) -> str:
    """The canonical value with the modifier run the pattern captured before it ("wearing
    glasses" takes them after its verb: wearing round glasses)."""
    modifiers = " ".join((match.group(1) or "").lower().split())
    words = value.split()
    kept = [m for m in modifiers.split() if m not in words]  # "thick full beard" says full twice
    if not kept:
        return value
    verb = "wearing " if value.startswith("wearing ") else ""
    return verb + " ".join(kept + [value.removeprefix(verb)])


WORD = re.compile(r"[a-z][\w-]*", re.IGNORECASE)


def _parse_hair(work: _Text, lexicon: Lexicon, parsed: ParsedInstruction) -> None:
    if "hair" in parsed.attributes:
        return
    # "a blonde woman with long hair": the colour from the noun, the rest from the hair phrase
    named = [value.removesuffix(" hair") for value, pattern in lexicon.hair_nouns.items() if work.take_all(pattern)]
    if named:
        parsed.attributes["hair"] = [" and ".join(named) + " hair"]
    for match in lexicon.hair_phrase.finditer(work.text):
        # The hair's own words: the run of style, colour and shade words (with "and" between
        # them) right before "hair", within its phrase: "Black woman, gray hair" is gray, and
        # "a five o'clock shadow and short black hair" is short black.
        phrase_start = match.group(1).rfind(",") + 1  # a comma ends the phrase before it
        spans = [m for m in WORD.finditer(match.group(1)) if m.start() >= phrase_start]
        own = 0
        for word in reversed([m.group(0) for m in spans]):
            if _describes_hair(word, lexicon) or (own and word.lower() in ("and", "&")):
                own += 1
            else:
                break
        spans = spans[len(spans) - own :]
        while spans and spans[0].group(0).lower() in ("and", "&"):
            spans = spans[1:]
        words = [m.group(0) for m in spans]
        noun = match.group(2).lower()
        if not noun.startswith("hair"):  # "long braids", "a short black bob"
            if not words and noun not in lexicon.hair_nouns_alone:
                continue  # "Bob" alone is a name, not a haircut
            words.append(noun)
        phrase = " ".join(words)
        styles = [s for s, p in lexicon.hair_styles.items() if p.search(phrase)]  # "shoulder length" too
        colors = _hair_colors(words, lexicon)
        colors += [c for c in named if c not in colors]
        if styles or colors:
            parsed.attributes["hair"] = [" ".join(styles + ([" and ".join(colors)] if colors else []) + ["hair"])]
            start = match.start(1) + spans[0].start() if spans else match.start(2)
            work.cut(start, match.end())
            return


def _describes_hair(word: str, lexicon: Lexicon) -> bool:
    # a word of a two-word style counts too: the "shoulder" and "length" of shoulder length
    rules: list[Matcher] = [*lexicon.hair_styles.values(), *lexicon.hair_colors.values(), lexicon.hair_shades]
    return word.lower() in lexicon.hair_style_words or any(rule.fullmatch(word) for rule in rules)


def _hair_colors(words: list[str], lexicon: Lexicon) -> list[str]:
    """The colours among a hair phrase's words, in their order ("blonde and brown"); a shade
    right before a colour qualifies it ("dark brown", not black and brown)."""

    def color_of(word: str) -> str | None:
        return next((c for c, p in lexicon.hair_colors.items() if p.fullmatch(word)), None)

    colors: list[str] = []
    for index, word in enumerate(words):
        following = color_of(words[index + 1]) if index + 1 < len(words) else None
        if lexicon.hair_shades.fullmatch(word) and following:
            continue  # named with the colour it qualifies
        color = color_of(word)
        if color is None:
            continue
        previous = words[index - 1] if index else ""
        if previous and lexicon.hair_shades.fullmatch(previous):
            color = f"{previous.lower()} {color}"
        if color not in colors:
            colors.append(color)
    return colors


def _parse_identity(work: _Text, lexicon: Lexicon, parsed: ParsedInstruction) -> None:
    # First listed wins (South Asian before Asian); see Lexicon.ethnicity_in_context.
    ethnicity, ethnicity_gender = None, None
    for name, pattern in lexicon.ethnicity_in_context.items():
        if match := work.take(pattern):
            ethnicity, ethnicity_gender = name, lexicon.gendered_ethnicity.get(match.group(0).strip(" ,").lower())
            break
    # a gendered noun first: "a teen girl" is a girl, though "teen" (a person noun) comes first;
    # then a role that tells the gender ("a bride", kept as content) or a gendered ethnicity word
    # ("a Latina college student")
    gendered = {name: p for name, p in lexicon.gender.items() if name != "person"}
    gender = (
        _first_match(work, gendered)
        or _first_match(work, lexicon.gendered_roles)
        or ethnicity_gender
        or _first_match(work, {"person": lexicon.gender["person"]})
        or _first_match(work, lexicon.pronouns)
    )
    for rule in (*lexicon.gender.values(), *lexicon.pronouns.values()):
        work.take_all(rule)
    if ethnicity:
        work.take_all(lexicon.ethnicity_context)
    if parsed.identity is None and gender:
        parsed.identity = f"{ethnicity} {gender}" if ethnicity else gender
    elif parsed.identity is None and ethnicity:
        parsed.identity = f"{ethnicity} person"


def _match_identity_to_age(parsed: ParsedInstruction, lexicon: Lexicon) -> None:
    """'a boy aged 10' is a boy, 'a Japanese girl aged 22' a woman, 'a man, 16' a boy: CLIP
    draws the noun, so the noun must agree with the age. Without an age the noun stays."""
    age = (parsed.attributes.get("age") or [""])[0].removeprefix("age:")
    if not parsed.identity or not age:
        return
    minor = int(age) < lexicon.adult_age if age.isdigit() else age in lexicon.minor_age_groups
    *ethnicity, noun = parsed.identity.split(" ")
    youth_of = {adult: youth for youth, adult in lexicon.adult_of.items()}
    if minor and noun in youth_of:
        noun = youth_of[noun]
    elif not minor and age.isdigit() and noun in lexicon.adult_of:
        noun = lexicon.adult_of[noun]
    parsed.identity = " ".join([*ethnicity, noun])


def _first_match(work: _Text, group: Mapping[str, Matcher]) -> str | None:
    found = [(m.start(), name) for name, p in group.items() if (m := p.search(work.text))]
    return min(found)[1] if found else None


def _collect_leftovers(work: _Text, lexicon: Lexicon, parsed: ParsedInstruction) -> None:
    work.take_all(lexicon.noise)
    values = attribute_values.terms(parsed.attributes)
    said = _words_of([parsed.identity or "", parsed.style or "", *parsed.quality, *values], lexicon)
    for phrase in PHRASE_BREAK.split(work.text):
        phrase = " ".join(re.findall(r"[\w'&+-]+", phrase)).strip(" -'")
        if not phrase or not re.search(r"[^\W\d_]", phrase) or phrase.lower() in (e.lower() for e in parsed.extra):
            continue
        # Said already: "a dramatic portrait, moody lighting" -> dramatic lighting, not also "dramatic";
        # "angry-looking, frowning" -> angry expression.
        if _words_of([phrase], lexicon) <= said:
            continue
        parsed.extra.append(phrase)


def _words_of(terms: list[str], lexicon: Lexicon) -> set[str]:
    """The content words of `terms`, lower case, hyphenated words split, filler left out."""
    words = {w for term in terms for w in re.findall(r"[^\W\d_]+", term.lower())}
    return {w for w in words if not lexicon.filler.fullmatch(w)}
