"""Caption sanity flags on crafted texts, including near misses that must stay unflagged."""

import pytest

from beam_captions.quality import better_caption, check_caption, loop_coverage

SOUND = [
    "A red car drives down a wet street at night while people with umbrellas walk along the shop windows.",
    "Very very tall trees line the river; the camera pans left, then right, then left again to the bridge.",
    "The man says I cannot find my keys, then searches his coat pockets and laughs.",
    "ha ha ha",
    "Cars pass. Cars pass again. A bus stops at the light, and a cyclist waits beside it.",
]
LOOPS = [
    "The dog runs. the dog runs the dog runs the dog runs the dog runs the dog runs the dog runs",
    "A woman walks into the room and sits down. " + "She looks at the window. " * 8,
    "andlyusromjlowun pun pun pun pun pun pun pun pun pun pun pun pun pun pun",
    "ftftftftftftftftftftftftftftftftftftftftftftftftft",
]
REFUSALS = [
    "I'm sorry, but I can't help with that request.",
    "I cannot describe this video because it may contain people.",
    "Unfortunately, I am unable to view videos.",
    "As an AI language model, I do not watch videos.",
]


@pytest.mark.parametrize("text", SOUND)
def test_sound_captions_are_not_flagged(text):
    assert check_caption(text, 30, "stop").flags == ()


@pytest.mark.parametrize("text", LOOPS)
def test_loops_covering_most_of_the_text_are_flagged(text):
    assert loop_coverage(text) >= 0.5
    assert "repetition" in check_caption(text, 80, "stop").flags


def test_several_loops_that_together_cover_most_of_the_text_are_flagged():
    text = ("om veoat " + "cl ne " * 6 + "clisin " * 4 + "cl of " * 7 + "undingein " + "undin " * 9
            + "a car turns left at the light")
    assert loop_coverage(text) >= 0.5 and "repetition" in check_caption(text).flags


def test_a_short_repeat_inside_a_long_caption_is_not_a_loop():
    text = SOUND[0] + " " + "The dog barks. " * 3 + SOUND[1] + " " + SOUND[2]
    assert loop_coverage(text) < 0.5 and check_caption(text).flags == ()


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_are_flagged(text):
    assert "refusal" in check_caption(text, 12, "stop").flags


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_is_flagged(text):
    assert check_caption(text, 0, "stop").flags == ("empty",)


def test_truncated_comes_from_the_finish_reason():
    assert check_caption(SOUND[0], 512, "length").flags == ("truncated",)
    check = check_caption(SOUND[0], 25, "stop")
    assert check.sound and check.num_tokens == 25 and check.finish_reason == "stop"


def test_better_caption_prefers_fewer_and_milder_flags_and_ties_keep_the_first():
    empty, loop, cut, clean = (check_caption("", 0, "stop"), check_caption(LOOPS[0], 9, "stop"),
                               check_caption(SOUND[0], 9, "length"), check_caption(SOUND[0], 9, "stop"))
    assert better_caption(empty, loop) and better_caption(loop, cut) and better_caption(cut, clean)
    assert not better_caption(cut, cut) and not better_caption(clean, loop)
