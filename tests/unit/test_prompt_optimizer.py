"""The prompt optimizer on hand-picked cases: each rule, each language, the 77-token
window, namespace prefixes, and the labelled instruction set."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from deployments.prompt.optimizer import PromptOptimizerEngine, merge_negative_prompt, optimize_prompt

EXAMPLE = (
    "A smiling Asian man who is wearing glasses and looks about 35 years old, standing in a studio "
    "with soft lighting, highly detailed skin texture, sharp focus"
)
TEMPLATE = "portrait photo, front view, studio lighting"
DATASET = Path(__file__).resolve().parents[1] / "data" / "portrait_instructions.jsonl"
HELD_OUT = DATASET.with_name("portrait_instructions_heldout.jsonl")
# The held-out set is frozen: its rows never move to the tuning set and are never edited, not
# even when a rule is added for one of them. Changing this hash is not allowed; if a fresh
# measure of unseen phrasings is needed, write a new held-out file.
HELD_OUT_SHA256 = "b300a72a7a78bf8641aadd9ae673b635ddf037a75db8969b913e77c17c0a7e5d"


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    return PromptOptimizerEngine(tiny_model_path, templates={"studio-portrait": TEMPLATE})


def test_the_held_out_set_is_frozen():
    assert hashlib.sha256(HELD_OUT.read_bytes()).hexdigest() == HELD_OUT_SHA256


def test_issue_example_yields_the_core_attributes(engine):
    result = engine.optimize(EXAMPLE)
    assert result.attribute_text() == {
        "identity": "Asian man",
        "age": "age:35",
        "expression": "smiling expression",
        "glasses": "wearing glasses",
        "lighting": "soft lighting",
    }
    assert result.prompt.startswith("Asian man, age:35, smiling expression, wearing glasses")
    assert result.prompt_tokens < result.original_tokens


def test_structured_builder_orders_keys_and_omits_neutral():
    text = optimize_prompt(
        "Asian",
        {
            "lighting": ["soft lighting"],
            "glasses": ["wearing glasses"],
            "expression": ["neutral"],
            "age": ["35"],
            "gender": ["man"],
            "accessories": ["earrings", "hat"],
            "pose": ["side profile"],
            "hair": ["short black hair"],
            "background": ["outdoors", "blurred background"],
            "facial_hair": ["beard", "mustache"],
        },
        quality=["sharp focus"],
    )
    assert text == (
        "Asian man, age:35, wearing glasses, short black hair, beard and mustache, side profile, soft lighting, "
        "outdoors, blurred background, earrings, hat, photorealistic, sharp focus"
    )


def test_attribute_values_are_lists_inside_and_text_at_the_api(engine):
    result = engine.optimize("a man with a beard and a mustache, outdoors, blurred background, gold earrings, a hat")
    assert result.attributes["facial_hair"] == ["beard", "mustache"]
    assert result.attributes["background"] == ["outdoors", "blurred background"]
    # /v1/prompts/optimize: each key as the prompt says it, accessories as a list
    text = result.attribute_text()
    assert text["facial_hair"] == "beard and mustache"
    assert text["background"] == "outdoors, blurred background"
    assert text["accessories"] == result.attributes["accessories"]
    assert "beard and mustache" in result.prompt and "outdoors, blurred background" in result.prompt
    # identity, facial hair, background, one per accessory
    assert result.attribute_count() == 3 + len(result.attributes["accessories"])


@pytest.mark.parametrize(
    "phrase,key,value",
    [
        ("a man about 35 years old", "age", "age:35"),
        ("a 35-year-old man", "age", "age:35"),
        ("a man in his thirties", "age", "age:35"),
        ("a woman in her 40s", "age", "age:45"),
        ("a woman aged 52", "age", "age:52"),
        ("a woman around 25 with red hair", "age", "age:25"),
        ("a man, roughly 60, side view", "age", "age:60"),
        ("a grinning woman", "expression", "smiling expression"),
        ("a man wearing spectacles", "glasses", "wearing glasses"),
        ("a bespectacled man", "glasses", "wearing glasses"),
        ("a woman in sunglasses", "glasses", "wearing sunglasses"),
        ("a woman with curly red hair", "hair", "curly red hair"),
        ("a Black woman, gray hair", "hair", "gray hair"),
        ("a redhead woman", "hair", "red hair"),
        ("a man with a thick beard", "facial_hair", "full beard"),
        ("a woman looking at the camera", "view", "front view"),
        ("a man under golden hour light", "lighting", "golden hour"),
        ("a woman, bokeh", "background", "blurred background"),
    ],
)
def test_english_phrasings_map_to_canonical_attributes(engine, phrase, key, value):
    assert engine.optimize(phrase).attribute_text()[key] == value


def test_a_hedged_number_with_a_unit_is_not_an_age(engine):
    optimized = engine.optimize("portrait shot at about 85mm, a woman")
    assert "age" not in optimized.attributes and "85mm" in optimized.prompt


@pytest.mark.parametrize(
    "phrase,identity",
    [
        ("an Asian man", "Asian man"),
        ("a South Asian woman", "South Asian woman"),
        ("a female engineer, Latina, smiling", "Hispanic woman"),
        ("a man in a black suit", "man"),  # "black" describes the suit, not the man
        ("she is smiling", "woman"),
    ],
)
def test_identity(engine, phrase, identity):
    assert engine.optimize(phrase).attribute_text()["identity"] == identity


def test_filler_intensifiers_and_synonym_stacks_collapse(engine):
    result = engine.optimize(
        "please make a really very beautiful photo of a man, highly detailed, ultra detailed, "
        "intricate details, very clear, 8k, uhd"
    )
    assert result.prompt == "man, photorealistic, sharp focus, detailed"


@pytest.mark.parametrize(
    "text,quality",
    [
        ("a man, 8k, uhd, high resolution", "4K"),  # asked only for resolution: kept
        ("a man, 8k, highly detailed", "detailed"),  # detail and resolution: one term
        ("a man, ultra detailed skin texture, 8k, intricate details", "detailed skin texture"),  # the most specific
    ],
)
def test_detail_synonyms_collapse_to_one_term(engine, text, quality):
    prompt = engine.optimize(text).prompt
    assert prompt == f"man, photorealistic, {quality}"


def test_a_professional_photo_replaces_photorealistic(engine):
    assert engine.optimize("a realistic photo of a man, shot on a DSLR").prompt == "man, professional photo"
    assert engine.optimize("an oil painting of a man, very professional").prompt == "man, oil painting"


@pytest.mark.parametrize(
    "text,facial_hair",
    [
        ("a man with a neatly trimmed gray beard", "neatly trimmed gray beard"),
        ("a man with light stubble", "light stubble"),
        ("a man with a thick beard", "full beard"),
        ("a man with a beard and a white mustache", "beard and white mustache"),
    ],
)
def test_facial_hair_keeps_its_colour_and_every_kind(engine, text, facial_hair):
    assert engine.optimize(text).attribute_text()["facial_hair"] == facial_hair


@pytest.mark.parametrize(
    "text,prompt",
    [  # short inputs: the default style would make them longer
        ("close-up shot of a man", "man, closeup, photorealistic"),
        ("a man with a stern look, plain gray backdrop", "man, serious expression, gray background, photorealistic"),
        ("an African American woman laughing out loud", "Black woman, laughing expression"),
        ("a woman in an office setting", "woman, office background"),
    ],
)
def test_a_phrase_is_consumed_whole(engine, text, prompt):
    assert engine.optimize(text).prompt == prompt


def test_unknown_content_is_kept(engine):
    result = engine.optimize("a smiling woman with freckles holding a red umbrella")
    assert "freckles" in result.prompt and "red umbrella" in result.prompt


def test_chinese_maps_to_the_same_structure(engine):
    result = engine.optimize("一个35岁的亚洲男人，戴眼镜，微笑，黑发，白色背景，高清")
    assert result.prompt.startswith(
        "Asian man, age:35, smiling expression, wearing glasses, black hair, white background"
    )
    assert result.warnings == ()


@pytest.mark.parametrize(
    "text,age",
    [
        ("一个三十五岁的亚洲男人", "age:35"),
        ("十八岁的女孩", "age:18"),
        ("年龄二十，女性", "age:20"),
        ("四十多岁的男人", "age:45"),
        ("一百零二岁的老人", "age:102"),
        ("年龄：28，男", "age:28"),
    ],
)
def test_chinese_numeral_ages(engine, text, age):
    result = engine.optimize(text)
    assert result.attribute_text()["age"] == age
    assert not any("岁" in warning or "年龄" in warning for warning in result.warnings)


@pytest.mark.parametrize(
    "text,hair",
    [
        ("a woman with long blonde and brown hair", "long blonde and brown hair"),
        ("a man with dark brown hair", "dark brown hair"),
        ("a man with dark hair", "black hair"),
        ("a woman with platinum blonde hair", "platinum blonde hair"),
        ("a man with a five o'clock shadow and short black hair", "short black hair"),
        ("Black woman, gray hair", "gray hair"),
    ],
)
def test_hair_colours(engine, text, hair):
    assert engine.optimize(text).attribute_text()["hair"] == hair


def test_accessories_keep_their_colour_or_material(engine):
    result = engine.optimize("a woman with little gold hoop earrings, a red hat and a pearl necklace")
    assert result.attribute_text()["accessories"] == ["little gold earrings", "red hat", "pearl necklace"]  # as named
    assert "gold" not in result.prompt.replace("gold earrings", "")  # consumed with the earrings, not left over


def test_unknown_chinese_is_a_warning_not_dropped_silently(engine):
    result = engine.optimize("一位微笑的女士，穿着红色毛衣")
    assert result.attribute_text()["identity"] == "woman"
    assert any("红色毛衣" in warning for warning in result.warnings)


def test_compact_prompt_is_not_made_longer(engine):
    compact = "Asian man, age:35, smiling expression, wearing glasses"
    result = engine.optimize(compact)
    assert result.prompt_tokens <= result.original_tokens
    assert result.prompt == compact


def test_all_filler_still_gives_a_valid_prompt(engine):
    result = engine.optimize("please make it")
    assert result.prompt == "please make it" and result.warnings


def test_window_drops_quality_before_attributes(engine):
    long = (
        EXAMPLE
        + ", "
        + ", ".join(
            f"{w} tattoo"
            for w in (
                "dragon",
                "rose",
                "anchor",
                "tiger",
                "skull",
                "eagle",
                "lotus",
                "compass",
                "wolf",
                "koi",
                "phoenix",
                "snake",
                "heart",
                "star",
                "moon",
                "sun",
                "owl",
                "fox",
                "bear",
                "crane",
            )
        )
    )
    result = engine.optimize(long)
    assert result.prompt_tokens <= 75
    assert result.prompt.startswith("Asian man, age:35, smiling expression, wearing glasses, soft lighting")
    assert any("dropped quality term" in warning for warning in result.warnings)


def test_namespace_prompts_share_an_identical_token_prefix(engine):
    first = engine.optimize("a smiling woman with red hair", cache_namespace="studio-portrait")
    second = engine.optimize("an elderly man with a beard, side profile", cache_namespace="studio-portrait")
    assert first.prefix_tokens == second.prefix_tokens > 1
    ids_a = engine.tokenizer(first.prompt).input_ids
    ids_b = engine.tokenizer(second.prompt).input_ids
    assert ids_a[: first.prefix_tokens] == ids_b[: first.prefix_tokens]
    assert ids_a[first.prefix_tokens] != ids_b[first.prefix_tokens]
    assert engine.optimize("a smiling woman").prefix_tokens == 1  # no template: only BOS is shared


def test_a_namespace_template_is_not_counted_as_the_optimizers_cost(engine):
    """Three short prompts in a templated namespace once read "-400% saved": the template's
    tokens were counted as the optimizer's. They are counted apart."""
    template_tokens = len(engine.tokenizer(TEMPLATE + ",").input_ids) - 2  # without BOS/EOS
    for prompt in ("a smiling woman", "old man, beard", "a girl with red hair"):
        plain = engine.optimize(prompt)
        templated = engine.optimize(prompt, cache_namespace="studio-portrait")
        assert plain.template_tokens == 0 and templated.template_tokens == template_tokens
        assert templated.prompt_tokens > templated.original_tokens  # the template makes the text longer ...
        assert templated.user_tokens() == plain.user_tokens() == plain.prompt_tokens  # ... not the user's part
        assert templated.saved_fraction() == plain.saved_fraction() > -1


def test_negative_prompt_merges_defaults_and_deduplicates():
    merged = merge_negative_prompt("Blurry, ugly hands, ugly hands", ("blurry", "deformed eyes"))
    assert merged == "blurry, deformed eyes, ugly hands"


def test_disabled_optimizer_passes_the_prompt_through(engine):
    result = engine.optimize("  A smiling\nman ", "blurry", enabled=False)
    assert result.prompt == "A smiling man" and result.negative_prompt == "blurry"


# Labelled attributes the optimizer is known to miss, with why: a new miss fails the test,
# and so does a fixed one left on this list.
KNOWN_MISSES = {
    ("en-225", "wearing glasses"): "a typo ('glases'): the lexicon matches words as written",
    ("en-282", "long braided hair"): "'long box braids': 'box' is no hair word, so the hair's own words stop before it",
}


def test_labelled_set_keeps_every_attribute(engine):
    rows = [json.loads(line) for line in DATASET.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 150 and sum(r["lang"] == "zh" for r in rows) >= 20
    missed = set()
    for row in rows:
        text = engine.optimize(row["instruction"]).prompt.lower()
        for value in row["expected"].values():
            for term in value if isinstance(value, list) else [value]:
                if term.lower() not in text:
                    missed.add((row["id"], term))
    assert missed == set(KNOWN_MISSES)


def test_concurrent_calls_give_the_sequential_results(tiny_model_path):
    """The served PromptOptimizer runs its sync method on Serve's thread pool. The fast
    CLIP tokenizer keeps padding/truncation as state between calls (routing_key pads to
    77), so unguarded concurrent calls miscounted tokens and returned a different prompt
    (seen as a 32/255 image difference between concurrent and sequential requests)."""
    import concurrent.futures

    from deployments.prompt.optimizer import PromptOptimizerEngine

    engine = PromptOptimizerEngine(tiny_model_path)
    prompts = [f"portrait number {i} round {i % 3}" for i in range(8)] + [
        "A smiling Asian man who is wearing glasses and looks about 35 years old"
    ]
    expected = {p: engine.optimize(p) for p in prompts}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: (p, engine.optimize(p)), prompts * 40))
    wrong = [(p, r.prompt, expected[p].prompt) for p, r in results if r != expected[p]]
    assert not wrong, wrong[:3]


@pytest.mark.parametrize(
    "text,key,value",
    [
        ("a Nigerian woman, 34, with braided hair", "identity", "Black woman"),
        ("a Nigerian woman, 34, with braided hair", "age", "age:34"),
        ("a Vietnamese grandfather with a cane", "identity", "Asian man"),
        ("a Black teenager in a hoodie", "identity", "Black person"),
        ("a Black teenager in a hoodie", "age", "teenage"),
        ("a teen girl with braids", "identity", "girl"),
        ("a Korean man, early forties", "age", "age:45"),
        ("a blonde Caucasian woman with long hair", "hair", "long blonde hair"),
        ("a grey-haired man", "hair", "gray hair"),
        ("a woman glaring angrily", "expression", "angry expression"),
        ("a man, dramatic side lighting", "lighting", "dramatic lighting"),
        ("a man on a city street", "background", "outdoors"),
    ],
)
def test_phrasings_found_missing_by_the_held_out_set(engine, text, key, value):
    assert engine.optimize(text).attribute_text()[key] == value


def test_a_number_with_a_unit_after_a_person_is_not_an_age(engine):
    assert "age" not in engine.optimize("a woman, 85mm lens, soft light").attributes


def test_every_value_of_a_key_is_kept_in_the_order_named(engine):
    attributes = engine.optimize("a man outdoors in a park, blurred background, close-up, front view").attribute_text()
    assert attributes["background"] == "outdoors, blurred background"
    assert attributes["view"] == "closeup, front view"


def test_a_compact_prompt_with_two_values_of_a_key_keeps_both_and_is_not_longer(engine):
    compact = "woman, outdoors, 4k, blurred background"
    result = engine.optimize(compact)
    assert result.attribute_text()["background"] == "outdoors, blurred background"
    assert result.prompt_tokens <= result.original_tokens


def test_implied_values_give_way_to_explicit_ones(engine):
    assert engine.optimize("a woman in a studio with soft lighting").attribute_text()["lighting"] == "soft lighting"
    assert engine.optimize("a woman in a studio").attribute_text()["lighting"] == "studio lighting"
    assert engine.optimize("a happy, laughing man").attribute_text()["expression"] == "laughing expression"
    assert engine.optimize("a happy man").attribute_text()["expression"] == "smiling expression"


def test_the_longest_phrasing_wins_whatever_the_lexicon_order(engine):
    # 'outdoors?' and 'serious' are listed before the canonical values they are part of
    result = engine.optimize(
        "Please make an elderly woman with a serious expression, outdoor background, "
        "very very detailed, ultra sharp, 4k"
    )
    terms = [term.strip() for term in result.prompt.split(",")]
    assert "background" not in terms and "expression" not in terms, terms
    assert result.attribute_text()["background"] == "outdoors"
    assert result.attribute_text()["expression"] == "serious expression"


def test_a_word_inside_another_term_is_not_a_duplicate(engine):
    # "Black" is not said by "short black hair": the old substring check dropped it silently
    assert engine.optimize("a Black teenager with short black hair").prompt.startswith("Black person, teenage")


def test_chinese_hair_words_in_english_order(engine):
    assert engine.optimize("一个女人，金发，长发，卷发").attribute_text()["hair"] == "long curly blonde hair"
    assert engine.optimize("奶奶，白发").attribute_text()["identity"] == "woman"


def test_black_and_white_is_a_style_not_an_identity(engine):
    result = engine.optimize("a black and white portrait of a smiling woman")
    assert result.attribute_text()["identity"] == "woman" and "black and white photo" in result.prompt


@pytest.mark.parametrize(
    "text,attribute,negative",
    [
        ("a man with no smile, stern", ("expression", "serious expression"), "smiling"),
        ("a woman without glasses, not wearing a hat, smiling", ("expression", "smiling expression"), "glasses, hat"),
        ("a man with no beard, short black hair", ("hair", "short black hair"), "beard"),
        ("一个男人，不戴眼镜，微笑", ("expression", "smiling expression"), "glasses"),
    ],
)
def test_what_is_asked_away_goes_to_the_negative_prompt(engine, text, attribute, negative):
    result = engine.optimize(text)
    key, value = attribute
    assert result.attribute_text()[key] == value
    assert result.negative_prompt.endswith(", " + negative)  # after the stable defaults
    assert not any(word in result.prompt for word in negative.split(", "))


@pytest.mark.parametrize(
    "text,identity",
    [
        ("a boy aged 10 with a cap", "boy"),
        ("a Japanese girl aged 22", "Asian woman"),  # an adult: CLIP draws the noun
        ("a man, 16, short black hair", "boy"),
        ("a Latino boy, about 12 years old", "Hispanic boy"),
        ("a teenage girl with long hair", "girl"),
        ("a girl with red hair", "girl"),  # no age: the noun as written
        ("小男孩，十岁，短发", "boy"),
        ("一个女生，二十八岁", "woman"),
    ],
)
def test_the_identity_noun_agrees_with_the_age(engine, text, identity):
    assert engine.optimize(text).attribute_text()["identity"] == identity


@pytest.mark.parametrize(
    "text,key,value",
    [
        ("a Latina college student with curly hair", "identity", "Hispanic woman"),
        ("a Latina with curly hair", "identity", "Hispanic woman"),
        ("a Kenyan farmer, weathered face", "identity", "Black person"),  # farmer stays as content
        ("a South Asian bride, smiling", "identity", "South Asian woman"),
        ("a dentist, bright clean office behind her", "background", "office background"),
        ("a woman walking down a street", "background", "outdoors"),
        ("a man, colored backlight", "lighting", "colored backlit"),
        ("a woman with a blonde pixie cut", "hair", "pixie cut blonde hair"),
        ("a man, soft studio light", "lighting", "soft studio lighting"),
        ("a woman, warm natural light", "lighting", "warm natural lighting"),
        ("a woman, soft lighting", "lighting", "soft lighting"),  # a modifier the value says is not doubled
        ("a bearded Turkish man, thick black beard", "facial_hair", "thick black beard"),
        ("a man, front facing", "view", "front view"),
        ("一个男生，黑色短发", "hair", "short black hair"),
    ],
)
def test_phrasings_from_the_second_held_out_set(engine, text, key, value):
    assert engine.optimize(text).attribute_text()[key] == value


def test_an_extra_phrase_already_said_by_a_structured_term_is_dropped(engine):
    # "dramatic" is said by dramatic lighting, "angry-looking" by angry expression
    prompt = engine.optimize("a dramatic portrait of an angry-looking man, moody lighting, frowning").prompt
    assert prompt == "man, angry expression, dramatic lighting, photorealistic"


def test_greetings_hedges_and_request_verbs_are_filler(engine):
    prompt = engine.optimize(
        "Good morning! Could you render me a woman, probably in her thirties, thanks so much"
    ).prompt
    assert prompt == "woman, age:35, photorealistic"


def test_canonical_values_are_spelled_in_the_fewest_clip_tokens(engine):
    # A hyphen is a CLIP token of its own: "close-up" costs 3 tokens, "closeup" 1.
    lexicon = engine.lexicon
    values = [v for group in lexicon.attributes.values() for v in group] + list(lexicon.quality)
    costly = [v for v in values if "-" in v and engine.count_tokens(v) > engine.count_tokens(v.replace("-", " "))]
    assert not costly
    assert engine.optimize("a close-up of a man").attribute_text()["view"] == "closeup"
    assert engine.optimize("a man, 8k uhd").prompt == "man, photorealistic, 4K"


@pytest.mark.parametrize(
    "text,prompt",
    [
        ("a man, golden hour lighting", "man, golden hour"),  # no leftover "lighting"
        ("a woman, soft natural window light", "woman, soft natural lighting"),
    ],
)
def test_a_modified_value_takes_its_longest_phrasing(engine, text, prompt):
    assert engine.optimize(text).prompt == prompt


@pytest.mark.parametrize(
    "text,glasses",
    [
        ("a man with round spectacles", "wearing round glasses"),
        ("a nurse with thin rimmed glasses", "wearing thin rimmed glasses"),
        ("a woman in reading glasses", "wearing reading glasses"),
        ("a man wearing glasses", "wearing glasses"),
    ],
)
def test_glasses_keep_their_shape_and_kind(engine, text, glasses):
    assert engine.optimize(text).attribute_text()["glasses"] == glasses


@pytest.mark.parametrize(
    "text,key,value",
    [
        ("a little girl around six with pigtails", "age", "age:6"),
        ("a man aged forty-two", "age", "age:42"),
        ("a woman, thirty five years old", "age", "age:35"),
        ("Caucasian female, 50s, silver bob", "age", "age:55"),
        ("East Asian businessman, forties, short hair", "age", "age:45"),
        ("an older Korean gentleman, maybe 70, with a beard", "age", "age:70"),
        ("an old fisherman", "age", "old"),
        ("a serious-looking woman", "expression", "serious expression"),
        ("a woman, blurry background", "background", "blurred background"),
        ("a boy outside on a farm", "background", "outdoors"),
        ("a man, soft morning light", "lighting", "soft natural lighting"),
        ("a woman, softbox lighting", "lighting", "studio lighting"),
        ("a woman with a short black bob", "hair", "short bob black hair"),
        ("a woman with big curly brown hair", "hair", "big curly brown hair"),
        ("a blonde woman with her hair down", "hair", "blonde hair"),  # raised IndexError before
        ("一个男人，特写，戏剧性灯光", "lighting", "dramatic lighting"),
    ],
)
def test_phrasings_from_the_third_held_out_set(engine, text, key, value):
    assert engine.optimize(text).attribute_text()[key] == value


def test_number_words_are_ages_only_where_an_age_is_said(engine):
    assert engine.optimize("a man with one earring, smiling").attribute_text() == {
        "identity": "man",
        "expression": "smiling expression",
        "accessories": ["earrings"],
    }
    assert "age" not in engine.optimize("a man named Bob, 80s style").attributes


def test_an_optimized_prompt_optimizes_to_itself(engine):
    # The canonical forms parse back to the same attributes (a two-word hair style such as
    # "shoulder length" was read as one word at a time and lost), and never grow.
    for row in (json.loads(line) for line in DATASET.read_text(encoding="utf-8").splitlines() if line.strip()):
        first = engine.optimize(row["instruction"])
        again = engine.optimize(first.prompt)
        attributes = {k: v for k, v in first.attributes.items() if v != ["neutral"]}  # neutral is not written
        assert again.attributes == attributes, (row["id"], first.prompt)
        assert again.prompt_tokens <= first.prompt_tokens, row["id"]


def test_an_instruction_that_only_asks_things_away_does_not_name_them(engine):
    # "no glasses" as written puts glasses in front of CLIP
    result = engine.optimize("no glasses, without a smile, sharp")
    assert result.prompt == "photorealistic, sharp focus"
    assert result.negative_prompt.endswith(", smiling, glasses")
    assert any("only asks things away" in w for w in result.warnings)


def test_chinese_facial_hair_kinds_join_as_english_ones_do(engine):
    assert engine.optimize("一个男人，胡子，小胡子").attribute_text()["facial_hair"] == "beard and mustache"


@pytest.mark.parametrize(
    "text,key,value",
    [
        ("Ethiopian woman, 24, long braids, gold necklace", "hair", "long braided hair"),
        ("a toddler boy, blond curls, wide eyes", "hair", "curly blonde hair"),
        ("a woman with a high ponytail", "hair", "ponytail hair"),
        ("a man with short dreadlocks", "hair", "short dreadlocks hair"),
        ("chubby Latino dad, 45ish, bald", "age", "age:45"),
        ("an angry Scottish man, fifty-ish, ginger hair", "age", "age:50"),
        ("Headshot, Nigerian-American man, age 33", "identity", "Black man"),
        ("a Korean-Canadian woman", "identity", "Asian woman"),
    ],
)
def test_phrasings_from_the_fourth_held_out_set(engine, text, key, value):
    assert engine.optimize(text).attribute_text()[key] == value


@pytest.mark.parametrize(
    "text,key,value",
    [
        ("a woman with short white natural hair", "hair", "short natural white hair"),
        ("an old woman with white hair, plain blue background", "hair", "white hair"),
        ("an old woman with white hair, plain blue background", "background", "blue background"),
        ("a ten-year-old Mexican girl", "age", "age:10"),
        ("a grandfather in a tweed flat cap", "accessories", ["tweed flat hat"]),
        ("a man in a charcoal suit and a maroon tie", "accessories", ["charcoal suit", "maroon tie"]),
        ("a woman, blurred village background", "background", "blurred background"),
        ("a bald Black man with a salt-and-pepper beard, 55, wearing a turtleneck", "age", "age:55"),
        ("a bald Black man with a salt-and-pepper beard", "facial_hair", "salt-and-pepper beard"),
        ("an old Polish man with a big white mustache", "facial_hair", "big white mustache"),
        ("a tall Sudanese man", "identity", "Black man"),
        ("a Thai monk, 60s, shaved head", "identity", "Asian man"),
    ],
)
def test_phrasings_from_the_fifth_held_out_set(engine, text, key, value):
    assert engine.optimize(text).attribute_text()[key] == value


def test_a_compact_prompt_kept_as_written_says_why(engine):
    compact = "woman, smiling expression, sharp"  # every value verbatim; "sharp focus" would add a token
    result = engine.optimize(compact)
    assert result.prompt == compact
    assert result.warnings == ("kept as written: the structured form (7 tokens) is longer than the prompt (6)",)


@pytest.mark.parametrize(
    "text,identity,kept",
    [
        ("a South Asian bride, smiling", "South Asian woman", "bride"),
        ("a Thai monk in orange robes", "Asian man", "monk"),
        ("an elderly fisherman mending a net", "man", "fisherman"),
        ("a Japanese grandmother knitting", "Asian woman", "grandmother"),  # says old, unlike "woman"
    ],
)
def test_a_role_tells_the_gender_and_stays_in_the_prompt(engine, text, identity, kept):
    result = engine.optimize(text)
    assert result.attribute_text()["identity"] == identity
    assert kept in result.prompt
