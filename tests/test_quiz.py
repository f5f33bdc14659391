"""Quiz checkers: right answers pass, every wrong answer is rejected and explained."""

import math

import pytest
import torch

from course_utils.checks import REGISTRY, load_all
from course_utils.checks import quiz
from course_utils.checks.quiz import (
    INTERVIEW_QUESTIONS,
    PITFALL_QUESTIONS,
    MultipleChoice,
    NumericQuestion,
    check_interview_quiz,
    check_pitfall_quiz,
)

# Numeric keys worked out by hand from the module definitions, independent of the quiz's compute().
INTERVIEW_NUMBERS = {
    "q2": math.log(64),
    "q3": 1 / 0.07,
    "q6": 4 * 4 + 3 * 4 + (1 + 2 + 3),
    "q7": 4 * 4 + 4 * 3,
    "q9": (1280 * 576 + 576) + (576 * 576 + 576),
    "q10": 3,
    "q11": 2 * (64 * 64 + 64) + 2 * (48 * 64 + 64),
    "q12": 3 * (2 * (64 * 64 + 64) + 2 * (48 * 64 + 64)),
}
PITFALL_NUMBERS = {"q8": 9}

CHECKERS = {
    "interview": (check_interview_quiz, INTERVIEW_QUESTIONS, INTERVIEW_NUMBERS),
    "pitfalls": (check_pitfall_quiz, PITFALL_QUESTIONS, PITFALL_NUMBERS),
}


def right_answers(questions, numbers):
    answers = {}
    for question in questions:
        if isinstance(question, MultipleChoice):
            answers[question.key] = question.answer
        else:
            answers[question.key] = numbers[question.key]
    return answers


def wrong_value(question):
    """Return a wrong answer of the right type for ``question``."""
    if isinstance(question, MultipleChoice):
        return next(letter for letter in question.letters if letter != question.answer)
    right = question.right_answer()
    return right + 1 if question.integer else right * 1.5


def question_ids(questions):
    return [q.key for q in questions]


@pytest.mark.parametrize("name", sorted(CHECKERS))
def test_numeric_keys_match_hand_computation(name):
    _, questions, numbers = CHECKERS[name]
    numeric = [q for q in questions if isinstance(q, NumericQuestion)]
    assert sorted(q.key for q in numeric) == sorted(numbers)
    for question in numeric:
        assert question.right_answer() == pytest.approx(numbers[question.key], rel=1e-6), question.key


@pytest.mark.parametrize("name", sorted(CHECKERS))
def test_right_answers_pass(name):
    check, questions, numbers = CHECKERS[name]
    result = check(right_answers(questions, numbers), verbose=False)
    assert result.status == "passed"
    assert result.points == result.max_points


def test_answers_function_is_called():
    answers = right_answers(INTERVIEW_QUESTIONS, INTERVIEW_NUMBERS)
    assert check_interview_quiz(lambda: answers, verbose=False).status == "passed"


@pytest.mark.parametrize("key", question_ids(INTERVIEW_QUESTIONS))
def test_interview_wrong_answer_rejected(key, capsys):
    answers = right_answers(INTERVIEW_QUESTIONS, INTERVIEW_NUMBERS)
    question = next(q for q in INTERVIEW_QUESTIONS if q.key == key)
    answers[key] = wrong_value(question)

    result = check_interview_quiz(answers, raise_on_fail=False)
    report = capsys.readouterr().out

    assert result.status == "failed"
    assert f"[{key}]" in result.expected
    assert quiz.explain(question) in result.hint
    assert quiz.right_answer_text(question) in report


@pytest.mark.parametrize("key", question_ids(PITFALL_QUESTIONS))
def test_pitfall_wrong_answer_rejected(key):
    answers = right_answers(PITFALL_QUESTIONS, PITFALL_NUMBERS)
    question = next(q for q in PITFALL_QUESTIONS if q.key == key)
    answers[key] = wrong_value(question)
    result = check_pitfall_quiz(answers, raise_on_fail=False, verbose=False)
    assert result.status == "failed"
    assert quiz.explain(question) in result.hint


def test_every_wrong_answer_is_explained():
    answers = right_answers(INTERVIEW_QUESTIONS, INTERVIEW_NUMBERS)
    wrong_keys = ["q2", "q5", "q13"]
    for key in wrong_keys:
        answers[key] = wrong_value(next(q for q in INTERVIEW_QUESTIONS if q.key == key))

    result = check_interview_quiz(answers, raise_on_fail=False, verbose=False)

    assert "[q2]" in result.expected
    for key in wrong_keys:
        question = next(q for q in INTERVIEW_QUESTIONS if q.key == key)
        assert quiz.explain(question) in result.hint, key


def test_partial_credit_is_share_of_right_answers():
    answers = right_answers(INTERVIEW_QUESTIONS, INTERVIEW_NUMBERS)
    for key in ("q1", "q9"):
        answers[key] = wrong_value(next(q for q in INTERVIEW_QUESTIONS if q.key == key))

    result = check_interview_quiz(answers, raise_on_fail=False, verbose=False)

    total = len(INTERVIEW_QUESTIONS) + 1  # the answer-format case comes first
    assert result.total_cases == total
    assert result.passed_cases == total - 2
    assert result.points == round(result.max_points * (total - 2) / total, 2)


def test_stub_reports_not_implemented(capsys):
    def stub():
        raise NotImplementedError("練習")

    result = check_interview_quiz(stub)
    assert result.status == "not_implemented"
    assert result.points == 0
    assert "尚未實作" in capsys.readouterr().out


def test_crashing_answers_function_is_error():
    def broken():
        return {"q1": undefined_name}  # noqa: F821

    result = check_pitfall_quiz(broken, raise_on_fail=False, verbose=False)
    assert result.status == "error"
    assert "NameError" in result.got


@pytest.mark.parametrize("answers", [["A", "B"], "A", None, 3])
def test_non_dict_answers_rejected(answers):
    result = check_pitfall_quiz(answers, raise_on_fail=False, verbose=False)
    assert result.status == "failed"
    assert "dict" in result.expected


def test_unknown_key_rejected():
    answers = right_answers(PITFALL_QUESTIONS, PITFALL_NUMBERS)
    answers["Q1"] = "A"
    result = check_pitfall_quiz(answers, raise_on_fail=False, verbose=False)
    assert result.status == "failed"
    assert "Q1" in result.got


def test_missing_and_none_answers_rejected():
    answers = right_answers(PITFALL_QUESTIONS, PITFALL_NUMBERS)
    del answers["q2"]
    answers["q5"] = None
    result = check_pitfall_quiz(answers, raise_on_fail=False, verbose=False)
    assert result.status == "failed"
    assert "未作答" in result.got
    assert "[q5]" in result.hint


def test_template_answers_rejected():
    result = check_pitfall_quiz(quiz.answer_template(PITFALL_QUESTIONS), raise_on_fail=False, verbose=False)
    assert result.status == "failed"
    assert result.passed_cases == 1


@pytest.mark.parametrize("given", ["b", " B ", "(B)", "B."])
def test_choice_accepts_letter_spellings(given):
    question = MultipleChoice("x", "t", "?", ("one", "two", "three"), "B", "because")
    assert question.grade(given) == (True, "")


@pytest.mark.parametrize("given", ["D", "AB", "", "two"])
def test_choice_rejects_invalid_letter(given):
    question = MultipleChoice("x", "t", "?", ("one", "two", "three"), "B", "because")
    correct, problem = question.grade(given)
    assert not correct
    assert "A、B、C" in problem


@pytest.mark.parametrize("given", [1, 2.0, ["B"], True])
def test_choice_rejects_non_string(given):
    question = MultipleChoice("x", "t", "?", ("one", "two"), "B", "because")
    correct, problem = question.grade(given)
    assert not correct
    assert problem


def test_choice_rejects_answer_outside_options():
    with pytest.raises(ValueError, match="not one of"):
        MultipleChoice("x", "t", "?", ("one", "two"), "C", "because")


@pytest.mark.parametrize("given", [14592, 14592.0, torch.tensor(14592), torch.tensor(14592.0)])
def test_integer_question_accepts_equal_numbers(given):
    question = NumericQuestion("x", "t", "?", lambda: 14592, "{value}")
    assert question.grade(given) == (True, "")


@pytest.mark.parametrize("given", [14591, 14592.5, 14593])
def test_integer_question_rejects_off_by_one(given):
    question = NumericQuestion("x", "t", "?", lambda: 14592, "{value}")
    assert question.grade(given)[0] is False


@pytest.mark.parametrize("given", ["14592", None, True, float("nan"), float("inf"), torch.zeros(2)])
def test_numeric_question_rejects_non_numbers(given):
    question = NumericQuestion("x", "t", "?", lambda: 14592, "{value}")
    correct, problem = question.grade(given)
    assert not correct
    assert problem


def test_float_question_uses_relative_tolerance():
    question = NumericQuestion("x", "t", "?", lambda: math.log(64), "{value}", integer=False, rel_tol=0.01)
    assert question.grade(4.16)[0] is True
    assert question.grade(4.159 * 1.02)[0] is False
    assert question.grade(math.log(32))[0] is False


def test_explanation_fills_computed_value():
    question = next(q for q in INTERVIEW_QUESTIONS if q.key == "q9")
    assert "1,070,208" in quiz.explain(question)
    assert "{value}" not in quiz.explain(question)


def test_string_number_explains_type(capsys):
    answers = right_answers(INTERVIEW_QUESTIONS, INTERVIEW_NUMBERS)
    answers["q11"] = "14592"
    result = check_interview_quiz(answers, raise_on_fail=False, verbose=False)
    assert result.status == "failed"
    assert "不要加引號" in result.hint


def test_show_quiz_lists_questions_without_answers(capsys):
    quiz.show_quiz("interview")
    text = capsys.readouterr().out
    for question in INTERVIEW_QUESTIONS:
        assert f"[{question.key}]" in text
        assert quiz.explain(question) not in text


def test_show_quiz_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown quiz"):
        quiz.show_quiz("final-exam")


def test_quizzes_are_registered():
    load_all()
    assert REGISTRY["interview_quiz"]["function"] == "check_interview_quiz"
    assert REGISTRY["pitfall_quiz"]["function"] == "check_pitfall_quiz"


def test_answer_letters_are_spread():
    letters = [q.answer for q in INTERVIEW_QUESTIONS + PITFALL_QUESTIONS if isinstance(q, MultipleChoice)]
    assert len(set(letters)) >= 3
    assert max(letters.count(letter) for letter in set(letters)) <= len(letters) // 2
