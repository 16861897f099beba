"""The tag parser and the per-item checks of instruction generation."""

from __future__ import annotations

import pytest

from interleaf.instruct.parse import (
    Checks,
    check_response,
    choice_answer,
    is_near_duplicate,
    judge_answer,
    parse_items,
    parse_options,
    question_shingles,
    units,
)

OPTS = ["a red car", "a blue bus", "a dog", "a green tree"]


def test_parse_items_tolerates_case_spaces_braces_and_quotes():
    text = '< Q1 >{What is it?}</Q1>\n<q2> "Where?" </ q2 ><A2> {"there"} </A2><A1>it</A1><Q1>again</Q1>'
    assert parse_items(text) == {1: {"Q": "What is it?", "A": "it"}, 2: {"Q": "Where?", "A": "there"}}


@pytest.mark.parametrize(
    "text",
    [
        "A. a red car B. a blue bus C. a dog D. a green tree",
        "A) a red car\nB) a blue bus\nC) a dog\nD) a green tree",
        "(A) a red car (B) a blue bus (C) a dog (D) a green tree",
        "A: a red car; B: a blue bus; C: a dog; D: a green tree",
        "A、a red car B、a blue bus C、a dog D、a green tree",
    ],
)
def test_options_in_the_layouts_llms_write(text):
    assert parse_options(text) == OPTS


@pytest.mark.parametrize(
    "text",
    ["A. x B. y C. z", "A. x B. y C. z D. w E. v", "Options: A. x B. y C. z D. w", "B. x A. y C. z D. w", ""],
)
def test_options_other_than_four_in_order_are_refused(text):
    assert parse_options(text) is None


def test_option_markers_inside_words_are_not_options():
    assert parse_options("A. U.S.A. B. China C. Japan D. Peru") == ["U.S.A.", "China", "Japan", "Peru"]


@pytest.mark.parametrize(
    "answer, letter",
    [("B", "B"), ("(B)", "B"), ("B.", "B"), ("b", "B"), ("B. a blue bus", "B"), ("Option B", "B"),
     ("a dog", "C"), ("A dog", "C"), ("D) a green tree", "D"), ("选项B", "B"), ("B选项", "B")],
)  # fmt: skip
def test_choice_answers_name_one_option(answer, letter):
    assert choice_answer(answer, OPTS) == (letter, "", "")


@pytest.mark.parametrize(
    "answer, reason",
    [("E", "bad_answer"), ("B. a dog", "answer_mismatch"), ("the bus", "bad_answer"),
     ("Both A and B", "bad_answer"), ("maybe", "bad_answer")],
)  # fmt: skip
def test_choice_answers_that_name_no_option_or_the_wrong_text(answer, reason):
    assert choice_answer(answer, OPTS)[:2] == (None, reason)
    assert answer in choice_answer(answer, OPTS)[2]


def test_the_rejection_reason_is_the_answer_readers_not_a_phrase_of_its_message():
    """An answer that quotes "gives other text" and names no option is a bad answer, not a mismatch
    (the reason was read off the message, which quotes the answer)."""
    reply = (
        "<Q1>Which?</Q1><C1>A. cat B. hen C. dog D. cow</C1><A1>it gives other text</A1>"
        "<Q2>Which?</Q2><C2>A. cat B. hen C. dog D. cow</C2><A2>B. it gives other text</A2>"
    )
    kept, rejected = check_response("choice", reply, "en", Checks())
    assert not kept and [(r.reason, r.item) for r in rejected] == [("bad_answer", 1), ("answer_mismatch", 2)]
    assert "'it gives other text' names none of the options" in rejected[0].detail


def test_judge_answers():
    assert [judge_answer(a, "en") for a in ["Yes", "yes.", "TRUE", "No!", "no", "maybe"]] == [
        "Yes", "Yes", "Yes", "No", "No", None,
    ]  # fmt: skip
    assert [judge_answer(a, "zh") for a in ["是", "是的。", "否", "不是", "也许"]] == [
        "是",
        "是",
        "否",
        "否",
        None,
    ]


def test_checks_by_type():
    checks = Checks(min_long_units=5, max_short_units=3)
    long_reply = "<Q1>Why?</Q1><A1>Because it rains a lot there.</A1><Q2>How?</Q2><A2>Slowly.</A2>"
    kept, rejected = check_response("long", long_reply, "en", checks)
    assert [k.answer for k in kept] == ["Because it rains a lot there."]
    assert [(r.reason, r.item) for r in rejected] == [("answer_too_short", 2)]
    kept, rejected = check_response("short", "<Q1>What?</Q1><A1>a very big red car</A1>", "en", checks)
    assert not kept and rejected[0].reason == "answer_too_long"
    zh = "<Q1>这是什么？</Q1><A1>一辆红色的汽车</A1>"  # 7 CJK characters: 7 units
    assert check_response("short", zh, "zh", Checks(max_short_units=7))[0][0].answer == "一辆红色的汽车"
    assert check_response("short", zh, "zh", Checks(max_short_units=6))[1][0].reason == "answer_too_long"


def test_items_missing_parts_and_placeholders():
    reply = (
        "<Q1>Is the <object> red?</Q1><A1>Yes</A1>"
        "<Q2>{the generated question 2}</Q2><A2>No</A2>"
        "<Q3></Q3><A3>Yes</A3>"
        "<Q4>Is it red?</Q4>"
        "<Q5>Is the sky <blue>?</Q5><A5>Yes</A5>"
    )
    kept, rejected = check_response("judge", reply, "en", Checks())
    assert not kept
    assert [(r.reason, r.item) for r in rejected] == [
        ("placeholder_left", 1), ("placeholder_left", 2), ("empty_question", 3),
        ("missing_answer", 4), ("placeholder_left", 5),
    ]  # fmt: skip


def test_choice_items_with_bad_or_repeated_options():
    reply = (
        "<Q1>Which?</Q1><C1>A. x B. y C. z</C1><A1>A</A1>"
        "<Q2>Which?</Q2><C2>A. cat B. Cat C. dog D. cow</C2><A2>A</A2>"
        "<Q3>Which?</Q3><C3>A. cat B. hen C. dog D. cow</C3><A3>B. dog</A3>"
        "<Q4>Which?</Q4><C4>A. cat B. hen C. dog D. cow</C4><A4>E</A4>"
        "<Q5>Which?</Q5><C5>A. cat B. hen C. dog D. cow</C5><A5>dog</A5>"
    )
    kept, rejected = check_response("choice", reply, "en", Checks())
    assert [(r.reason, r.item) for r in rejected] == [
        ("bad_options", 1), ("duplicate_options", 2), ("answer_mismatch", 3), ("bad_answer", 4),
    ]  # fmt: skip
    assert [(k.answer, k.options) for k in kept] == [("C", ["cat", "hen", "dog", "cow"])]


def test_unparsable_reply_is_one_rejection():
    kept, rejected = check_response("short", "Sure! Here are three questions: ...", "en", Checks())
    assert not kept and [r.reason for r in rejected] == ["unparsable"] and "Sure!" in rejected[0].detail


def test_units_and_near_duplicates():
    assert units("这是 a Red-car!") == ["这", "是", "a", "red", "car"]
    a = question_shingles("What colour is the car in the picture?")
    b = question_shingles("What colour is the car in the picture ?")
    c = question_shingles("How many people stand near the car?")
    assert is_near_duplicate(a, b, 0.8) and not is_near_duplicate(a, c, 0.8)


# ----------------------------------------------------------------------------------------------------
# what GPT-3.5/4, Qwen and InternLM write around the format


def test_tag_numbers_with_leading_zeros_and_bold_around_tags_and_values():
    text = "**<Q01>** Is it red? **</Q01>**\n<A1>**Yes**</A1>\n<Q002>**Is it blue?**</Q2><A02>*No*</A02>"
    assert parse_items(text) == {1: {"Q": "Is it red?", "A": "Yes"}, 2: {"Q": "Is it blue?", "A": "No"}}
    assert parse_items("<Q10>ten</Q10><Q1>one</Q10>") == {10: {"Q": "ten"}}  # a number closes only itself


@pytest.mark.parametrize(
    "text",
    [
        "**A.** a red car **B.** a blue bus **C.** a dog **D.** a green tree",
        "- A. a red car\n- B. a blue bus\n- C. a dog\n- D. a green tree",
        "Ａ．a red car\nＢ．a blue bus\nＣ．a dog\nＤ．a green tree",
        "（A）a red car（B）a blue bus（C）a dog（D）a green tree",
    ],
)
def test_options_with_bold_bullets_and_full_width_markers(text):
    assert parse_options(text) == OPTS


def test_options_with_extra_lines_are_refused():
    """Is "Pick one." part of option D? It cannot be told, so the item is not kept with it in D."""
    assert parse_options("A. cat\nB. hen\nC. dog\nD. cow\nPick the one that is right.") is None
    assert parse_options("A. cat\nwith a hat\nB. hen\nC. dog\nD. cow") is None


@pytest.mark.parametrize(
    "answer, letter",
    [("The answer is B.", "B"), ("Answer: B", "B"), ("The correct answer is **(C) a dog**.", "C"),
     ("Answer - D", "D"), ("**B**", "B"), ("答案：B", "B"), ("正确答案是（B）", "B"), ("选B", "B"),
     ("Ｂ", "B"), ("（Ｃ）", "C"), ("Answer: a dog", "C")],
)  # fmt: skip
def test_choice_answers_with_the_words_llms_put_around_them(answer, letter):
    assert choice_answer(answer, OPTS) == (letter, "", "")


def test_choice_answers_that_name_two_options_are_refused():
    # a bare "A" is option A by its letter and option B by its text
    letter, reason, why = choice_answer("A", ["B", "A", "C", "D"])
    assert letter is None and reason == "bad_answer" and "ambiguous" in why
    letter, reason, why = choice_answer("A dog", ["dog", "A dog", "cat", "cow"])  # "A. dog" or B's text?
    assert letter is None and reason == "bad_answer" and "ambiguous" in why
    assert choice_answer("B", ["A", "B", "C", "D"]) == ("B", "", "")  # both readings agree
    assert choice_answer("The answer is B because hens lay eggs", OPTS)[0] is None
    assert choice_answer("Answers vary", OPTS)[0] is None


def test_judge_answers_with_a_prefix_or_a_reason():
    en = ["Yes, the car is red.", "No. There is no car.", "Answer: Yes", "The answer is: **No**.", "*yes*"]
    assert [judge_answer(a, "en") for a in en] == ["Yes", "No", "Yes", "No", "Yes"]
    assert [judge_answer(a, "zh") for a in ["不是，图中没有车。", "答案：是", "是的，有一辆车。"]] == [
        "否",
        "是",
        "是",
    ]
    for unclear in ["Yes and no", "Not sure, it may be", "是否", "Probably yes"]:
        assert judge_answer(unclear, "en") is None


def test_echoed_format_and_wordless_questions_are_rejected():
    reply = (
        "<Q1> question 1 </Q1> <A1> the short answer </A1>"
        "<Q2>问题2</Q2><A2>猫</A2>"
        "<Q3>What colour is the car?</Q3><A3>the short answer.</A3>"
        "<Q4>？？</Q4><A4>red</A4>"
        "<Q5>What colour is the car?</Q5><A5>red</A5>"
    )
    kept, rejected = check_response("short", reply, "en", Checks())
    assert [(r.reason, r.item) for r in rejected] == [
        ("placeholder_left", 1), ("placeholder_left", 2), ("placeholder_left", 3), ("empty_question", 4),
    ]  # fmt: skip
    assert [(k.item, k.answer) for k in kept] == [(5, "red")]


def test_comparisons_are_not_placeholders():
    reply = "<Q1>Is x < 5 and y > 3 in the chart?</Q1><A1>Yes</A1><Q2>Is the <shape> red?</Q2><A2>No</A2>"
    kept, rejected = check_response("judge", reply, "en", Checks())
    assert [k.question for k in kept] == ["Is x < 5 and y > 3 in the chart?"]
    assert [(r.reason, r.item) for r in rejected] == [("placeholder_left", 2)]
