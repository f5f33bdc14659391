"""Self-check quizzes: multiple-choice and short numeric questions, checked like any exercise.

A quiz is a list of questions. A :class:`MultipleChoice` question has lettered options and one
right letter. A :class:`NumericQuestion` computes its right value at check time from the
course's real modules (for example the parameter count of a
:class:`~course_utils.vlm.llava.LlavaProjector`), so the key cannot drift away from the code.

The learner writes the answers into a dict ``{"q1": "B", "q2": 1070208, ...}``, usually
returned by a function whose body is the exercise region, and passes the dict or the function
to a checker (:func:`check_interview_quiz`, :func:`check_pitfall_quiz`). Every answer is
graded before the report is printed. The cases run with the correct answers first, so the
partial credit equals the share of correct answers, and the failure report names the first
wrong question with its right answer and explanation, then the other wrong ones.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from course_utils.checks.base import Case, checker, fail

OPTION_LETTERS = "ABCDEF"


@dataclass(frozen=True)
class MultipleChoice:
    """A question with lettered options and one right letter.

    ``options`` are the option texts in order; they get the letters A, B, C, ... ``answer`` is
    the right letter. ``explanation`` explains why, in Traditional Chinese.
    """

    key: str
    topic: str
    prompt: str
    options: tuple[str, ...]
    answer: str
    explanation: str

    def __post_init__(self) -> None:
        if not 2 <= len(self.options) <= len(OPTION_LETTERS):
            raise ValueError(f"question {self.key!r} needs 2..{len(OPTION_LETTERS)} options, got {len(self.options)}.")
        if self.answer not in self.letters:
            raise ValueError(f"question {self.key!r}: answer {self.answer!r} is not one of {self.letters}.")

    @property
    def letters(self) -> str:
        return OPTION_LETTERS[: len(self.options)]

    def right_answer(self) -> str:
        return self.answer

    def describe_answer(self, answer: Any) -> str:
        letter = re.sub(r"[\s()（）.]", "", answer).upper() if isinstance(answer, str) else ""
        index = self.letters.find(letter) if len(letter) == 1 else -1
        return f"{letter}（{self.options[index]}）" if index >= 0 else repr(answer)

    def grade(self, answer: Any) -> tuple[bool, str]:
        """Return ``(correct, problem)``; ``problem`` explains an answer that is not a valid letter."""
        if not isinstance(answer, str):
            return False, f"選擇題要填一個字母字串，例如 \"{self.letters[0]}\"，你填的是 {type(answer).__name__}：{answer!r}。"
        letter = re.sub(r"[\s()（）.]", "", answer).upper()
        if len(letter) != 1 or letter not in self.letters:
            return False, f"這題的選項只有 {'、'.join(self.letters)}，你填的是 {answer!r}。"
        return letter == self.answer, ""

    def render(self) -> str:
        lines = [self.prompt]
        lines += [f"    ({letter}) {text}" for letter, text in zip(self.letters, self.options)]
        return "\n".join(lines)


@dataclass(frozen=True)
class NumericQuestion:
    """A question whose answer is a number computed by ``compute()`` at check time.

    ``integer`` questions must match exactly (a float within 1e-6 of the integer counts).
    Other questions accept a relative error up to ``rel_tol``. ``explanation`` may contain
    ``{value}``, which is replaced by the computed answer.
    """

    key: str
    topic: str
    prompt: str
    compute: Callable[[], float]
    explanation: str
    integer: bool = True
    rel_tol: float = 0.01
    digits: int = 3

    def right_answer(self) -> float:
        value = self.compute()
        if isinstance(value, torch.Tensor):
            value = value.item()
        return int(value) if self.integer else float(value)

    def format_value(self, value: float) -> str:
        return f"{int(value):,}" if self.integer else f"{value:.{self.digits}f}"

    def describe_answer(self, answer: Any) -> str:
        if isinstance(answer, numbers.Real) and not isinstance(answer, bool):
            return self.format_value(answer) if self.integer and float(answer).is_integer() else repr(answer)
        return repr(answer)

    def grade(self, answer: Any) -> tuple[bool, str]:
        """Return ``(correct, problem)``; ``problem`` explains an answer that is not a number."""
        if isinstance(answer, torch.Tensor) and answer.numel() == 1:
            answer = answer.item()
        if isinstance(answer, bool) or not isinstance(answer, numbers.Real):
            return False, f"這題要填一個數字（int 或 float，不要加引號），你填的是 {type(answer).__name__}：{answer!r}。"
        value = float(answer)
        if not math.isfinite(value):
            return False, f"答案必須是有限的數字，你填的是 {answer!r}。"
        expected = self.right_answer()
        if self.integer:
            return abs(value - expected) < 1e-6, ""
        return math.isclose(value, expected, rel_tol=self.rel_tol, abs_tol=1e-12), ""

    def render(self) -> str:
        kind = "（填整數）" if self.integer else f"（填數字，取到小數點後 {self.digits} 位即可）"
        return f"{self.prompt}{kind}"


Question = MultipleChoice | NumericQuestion


def render_quiz(questions: Sequence[Question]) -> str:
    """Return the questions as numbered text for the learner (no answers)."""
    blocks = [f"[{q.key}]（{q.topic}）{q.render()}" for q in questions]
    return "\n\n".join(blocks)


def answer_template(questions: Sequence[Question]) -> dict[str, None]:
    """Return ``{key: None}`` for every question, a dict for the learner to fill."""
    return {q.key: None for q in questions}


def right_answer_text(question: Question) -> str:
    """Return the right answer of ``question`` as the learner should read it (letter and option text, or number)."""
    right = question.right_answer()
    if isinstance(question, MultipleChoice):
        return question.describe_answer(right)
    return question.format_value(right)


def explain(question: Question) -> str:
    """Return why the right answer is right, in Traditional Chinese (numbers filled in by code)."""
    if isinstance(question, NumericQuestion):
        return question.explanation.format(value=question.format_value(question.right_answer()))
    return question.explanation


@dataclass
class QuestionResult:
    """The grade of one answer: ``correct``, the answer as given, and a problem note if invalid."""

    question: Question
    answer: Any
    correct: bool
    problem: str = ""


def grade_answers(answers: Mapping[str, Any], questions: Sequence[Question]) -> list[QuestionResult]:
    """Grade every question of ``questions`` against ``answers``; a missing key counts as wrong."""
    results = []
    for question in questions:
        if question.key not in answers or answers[question.key] is None:
            results.append(QuestionResult(question, None, False, "這題還沒有作答（值是 None 或沒有這個 key）。"))
            continue
        correct, problem = question.grade(answers[question.key])
        results.append(QuestionResult(question, answers[question.key], correct, problem))
    return results


def _resolve_answers(answers: Any) -> Any:
    """Call ``answers`` when it is a function; a stub's ``NotImplementedError`` propagates."""
    return answers() if callable(answers) else answers


def _raise(error: BaseException) -> Callable[[], None]:
    def run() -> None:
        raise error

    return run


def _failure_case(result: QuestionResult, others: list[QuestionResult]) -> Callable[[], None]:
    def run() -> None:
        question = result.question
        given = question.describe_answer(result.answer) if result.answer is not None else "（未作答）"
        hint = explain(question)
        if result.problem:
            hint = f"{result.problem}\n   {hint}"
        if others:
            hint += f"\n   另外還有 {len(others)} 題答錯或沒作答："
            for other in others:
                note = f"{other.problem} " if other.problem else ""
                hint += f"\n   - [{other.question.key}] {note}正確答案 {right_answer_text(other.question)}。{explain(other.question)}"
        fail(f"[{question.key}] {right_answer_text(question)}", f"你的答案 {given}", hint)

    return run


def _pass_case() -> None:
    return None


def build_quiz_cases(answers: Any, questions: Sequence[Question]) -> list[Case]:
    """Return the cases of a quiz check: answer format first, then one case per question.

    ``answers`` is a dict ``{question key: answer}`` or a zero-argument function returning one.
    The questions answered correctly come first, so the runner's partial credit (cases passed
    before the first failure) is the share of correct answers; the first failing case lists
    every wrong answer with its explanation. A function that raises ``NotImplementedError``
    (the exercise stub) yields one case that re-raises it, so the check reports "not
    implemented"; any other exception is reported as an error of the learner's code.
    """
    try:
        resolved = _resolve_answers(answers)
    except Exception as error:  # NotImplementedError or a bug in the learner's cell: report it through a case
        return [Case("讀取你的答案", _raise(error))]

    keys = [q.key for q in questions]

    def answer_format() -> None:
        if not isinstance(resolved, Mapping):
            fail("一個 dict，例如 {\"q1\": \"B\", ...}", f"{type(resolved).__name__}：{resolved!r}",
                 "作答函式最後要 return 一個 dict，key 是題號。")
        unknown = sorted(str(key) for key in resolved if key not in keys)
        if unknown:
            fail(f"題號只能是 {', '.join(keys)}", f"多了不認識的題號 {', '.join(unknown)}",
                 "檢查題號的拼法（小寫 q 加數字），或刪掉多出來的 key。")

    if not isinstance(resolved, Mapping):
        return [Case("答案的格式", answer_format)]

    results = grade_answers(resolved, questions)
    right = [result for result in results if result.correct]
    wrong = [result for result in results if not result.correct]
    cases = [Case("答案的格式", answer_format)]
    cases += [Case(f"第 {result.question.key} 題（{result.question.topic}）", _pass_case) for result in right]
    for index, result in enumerate(wrong):
        others = wrong[index + 1 :] if index == 0 else []
        cases.append(Case(f"第 {result.question.key} 題（{result.question.topic}）", _failure_case(result, others)))
    return cases


# ---------------------------------------------------------------------------------------------
# Answers computed from the course's modules (imported lazily, so loading the checkers stays cheap)
# ---------------------------------------------------------------------------------------------


def _uniform_clip_loss() -> float:
    from course_utils.vlm.clip import clip_loss

    # Identical features give every logit the same value, so each row's softmax is uniform.
    features = torch.ones(64, 8)
    return clip_loss(features, features.clone(), torch.tensor(math.log(1 / 0.07))).item()


def _initial_scale() -> float:
    from course_utils.vlm.clip import LOGIT_SCALE_INIT, effective_scale

    return effective_scale(LOGIT_SCALE_INIT).item()


def _itg_mask_entries() -> int:
    from course_utils.vlm.qformer import qformer_attention_mask

    mask = qformer_attention_mask("itg", 4, torch.ones(1, 3, dtype=torch.bool))  # (1, 7, 7)
    return int(mask.sum())


def _itc_mask_entries() -> int:
    from course_utils.vlm.qformer import qformer_attention_mask

    mask = qformer_attention_mask("itc", 4, torch.tensor([[True, True, True, False]]))  # (1, 8, 8)
    return int(mask[0].sum())


def _projector_parameters() -> int:
    from course_utils.vlm.llava import LlavaProjector

    projector = LlavaProjector(1280, 576, kind="mlp")
    return sum(p.numel() for p in projector.parameters())


def _cross_attention_parameters() -> int:
    from course_utils.vlm.attention import MultiHeadCrossAttention

    attention = MultiHeadCrossAttention(64, 4, d_context=48)
    return sum(p.numel() for p in attention.parameters())


def _sharing_savings() -> int:
    from course_utils.vlm.sharing import CrossAttentionStack, count_parameters

    unshared = CrossAttentionStack(4, 64, 4, 48, sharing="none")
    shared = CrossAttentionStack(4, 64, 4, 48, sharing="all")
    return count_parameters(unshared) - count_parameters(shared)


def _pooled_image_tokens() -> int:
    from course_utils.vlm.llava import pool_image_tokens

    return pool_image_tokens(torch.zeros(1, 49, 8), grid_size=3).shape[1]


def _supervised_label_positions() -> int:
    from course_utils.vlm.llava import IGNORE_INDEX, build_labels

    image_token_id, pad_id = 7, 0
    # One right-padded sample: 4 prompt tokens, 9 image tokens, 5 prompt tokens, 3 answer tokens, 3 pads.
    input_ids = torch.tensor([[11, 12, 13, 14] + [image_token_id] * 9 + [15, 16, 17, 18, 19] + [21, 22, 2] + [pad_id] * 3])
    answer_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    answer_mask[0, 18:21] = True
    attention_mask = (torch.arange(input_ids.shape[1]) < 21).long()[None]
    labels = build_labels(input_ids, answer_mask, attention_mask, image_token_id=image_token_id)
    return int((labels != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------
# The interview quiz of notebook 07
# ---------------------------------------------------------------------------------------------

INTERVIEW_QUESTIONS: tuple[Question, ...] = (
    MultipleChoice(
        "q1", "CLIP",
        "CLIP 的一個 batch 有 B 組配對，logits[i, j] = s·cos(image_i, text_j)。影像 i 那一列的 cross-entropy 目標是哪一個？",
        ("text i，也就是對角線", "和影像 i 有相同單字的所有文字", "相似度最高的那一則文字", "全部都是 0"),
        "A",
        "第 i 張影像的正確配對就是第 i 則文字，batch 裡其他 B-1 則都當負樣本，所以 targets = arange(B)。"
        "文字到影像的方向用同一個矩陣的轉置，兩個方向的 cross-entropy 取平均。",
    ),
    NumericQuestion(
        "q2", "CLIP",
        "一個 batch 有 64 組配對，但所有影像與文字特徵都完全相同。對稱的 CLIP 損失（兩個方向平均）是多少？",
        _uniform_clip_loss,
        "特徵都一樣時每一列的 logits 全部相等，softmax 是 64 類的均勻分布，正確類別的機率是 1/64，"
        "損失 = -ln(1/64) = ln 64 ≈ {value}。這也是剛初始化時損失從 ln(B) 附近開始的原因。",
        integer=False,
    ),
    NumericQuestion(
        "q3", "CLIP",
        "CLIP 把溫度存成 log 空間的 logit_scale，初始值 ln(1/0.07)。一開始真正乘在 cosine 上的 scale 是多少？",
        _initial_scale,
        "scale = exp(logit_scale) = 1/0.07 ≈ {value}。cosine 在 [-1, 1]，乘上這個數 logits 才拉得開；"
        "訓練時 scale 會繼續學，但上限夾在 100。",
        integer=False, digits=2,
    ),
    MultipleChoice(
        "q4", "CLIP",
        "為什麼 CLIP 先把影像與文字特徵做 L2 正規化，再算內積？",
        ("讓矩陣乘法比較快", "cross-entropy 規定輸入要是單位向量",
         "讓相似度變成 cosine：向量長度不能灌高分數，logits 的尖銳程度只由溫度控制", "可以減少參數量"),
        "C",
        "沒有正規化時，模型可以靠把某些向量變長來拉高分數，檢索排序也會被長度左右。"
        "正規化後內積就是 cosine，值域固定在 [-1, 1]，再由可學的溫度決定分布有多尖。",
    ),
    MultipleChoice(
        "q5", "BLIP-2",
        "凍結的影像編碼器輸出 N 個特徵向量。Q-Former 交給語言模型的是什麼？",
        ("N 個向量，和輸入一樣多", "固定 Q 個 query 的輸出，不管 N 是多少", "只有一個 pooled 向量", "一串文字 token"),
        "B",
        "Q-Former 用 Q 個可學的 queries 透過 cross-attention 讀影像特徵，輸出永遠是 Q 個向量（BLIP-2 用 32 個）。"
        "這個固定大小的瓶頸讓語言模型的輸入長度和影像解析度脫鉤，也逼 queries 只留下和文字有關的資訊。",
    ),
    NumericQuestion(
        "q6", "BLIP-2",
        "Q-Former 有 4 個 queries、3 個文字 token（沒有 padding）。ITG（生成）用的 7×7 self-attention 遮罩裡有幾個 True？",
        _itg_mask_entries,
        "queries 只看 queries：4×4 = 16 個；每個文字 token 看全部 4 個 queries，加上自己和前面的文字（1+2+3）："
        "3×4 + 6 = 18 個。合計 {value} 個。",
    ),
    NumericQuestion(
        "q7", "BLIP-2",
        "同樣 4 個 queries，文字有 4 個位置但最後一個是 padding。ITC（對比）遮罩（8×8，單一樣本）裡有幾個 True？",
        _itc_mask_entries,
        "ITC 裡 queries 和文字互相看不到：queries 看 queries 是 4×4 = 16；文字只看真正的文字 key（3 個），"
        "4 個文字列（padding 的列也照文字的規則）各 3 個是 12。合計 {value} 個。padding 只在 key 那一側遮掉。",
    ),
    MultipleChoice(
        "q8", "LLaVA",
        "LLaVA 的第一階段（特徵對齊）訓練哪些參數？",
        ("影像編碼器", "整個語言模型", "tokenizer 的詞表", "只有 projector；影像編碼器和語言模型都凍結"),
        "D",
        "第一階段只用圖片說明資料把 projector 學好，讓影像特徵落在語言模型看得懂的 embedding 空間；"
        "第二階段（指令微調）才把語言模型（或它的 LoRA）一起訓練，影像編碼器始終凍結。",
    ),
    NumericQuestion(
        "q9", "LLaVA",
        "LlavaProjector(vision_dim=1280, text_dim=576, kind=\"mlp\")（兩層 Linear，中間 GELU，都有 bias）有多少參數？",
        _projector_parameters,
        "第一層 1280×576 + 576，第二層 576×576 + 576，加起來 {value}。GELU 沒有參數。",
    ),
    NumericQuestion(
        "q10", "LLaVA",
        "一筆右側補齊的樣本：4 個提示 token、9 個 image token、5 個提示 token、3 個回答 token（含 <|im_end|>）、3 個 padding。"
        "build_labels 之後，有幾個位置的 label 不是 -100？",
        _supervised_label_positions,
        "只有回答的 token 保留原本的 id，系統／使用者提示、image token 和 padding 都是 -100，所以是 {value} 個。"
        "位移一格的事交給 loss 做，build_labels 不位移。",
    ),
    NumericQuestion(
        "q11", "Cross-attention",
        "MultiHeadCrossAttention(d_model=64, n_heads=4, d_context=48)（q、k、v、out 四個 Linear，都有 bias）有多少參數？",
        _cross_attention_parameters,
        "q_proj 64×64+64、k_proj 48×64+64、v_proj 48×64+64、out_proj 64×64+64，合計 {value}。"
        "head 數不影響參數量：4 個 head 只是把 64 維切成 4 份各 16 維。",
    ),
    NumericQuestion(
        "q12", "權重共享",
        "CrossAttentionStack 有 4 層（d_model=64, n_heads=4, d_context=48）。sharing=\"all\" 比 sharing=\"none\" 少幾個參數？",
        _sharing_savings,
        "\"all\" 讓 4 層共用同一個 cross-attention 模組，省下 3 份 cross-attention 的參數：{value}。"
        "LayerNorm 和 MLP 仍然每層一份，所以省的只有注意力那一塊。",
    ),
    MultipleChoice(
        "q13", "Cross-attention",
        "你的 padding 遮罩是 True = 真正的 token（可以看）。把它直接傳給 nn.MultiheadAttention 的 key_padding_mask，會發生什麼？",
        ("結果一樣", "丟出形狀錯誤", "模型只看 padding、忽略真正的 token，而且不會報錯", "PyTorch 會自動把遮罩取反"),
        "C",
        "nn.MultiheadAttention 的布林遮罩意思相反：True = 擋住。形狀完全合法所以不會報錯，"
        "只是注意力全落在 padding 上（沒有 padding 的那一列則整列被擋，輸出 NaN）。"
        "傳進去之前要先取反（~mask），或統一用 F.scaled_dot_product_attention 的慣例。",
    ),
    MultipleChoice(
        "q14", "Cross-attention",
        "有一段 cross-attention 程式用同一個 Linear 同時算 K 和 V，再把縮放過的分數直接乘上 V。主要的錯誤是什麼？",
        ("K 與 V 被綁成同一個投影，而且沒做 softmax：權重不是機率分布，加總也不是 1", "沒有錯",
         "少了 bias", "應該先乘 V 再乘 K"),
        "A",
        "K 決定「看哪裡」、V 決定「取出什麼」，兩者要各自的投影；分數還要沿 key 軸做 softmax，"
        "每個 query 的權重才是加總為 1 的分布。沒有 softmax 時輸出大小會隨 key 數量漂移。",
    ),
    MultipleChoice(
        "q15", "應用",
        "一個影像分類器在測試集上準確率很高，但陽性（有病灶）只佔 5%。最先要看哪些數字？",
        ("只看準確率就夠了", "訓練 loss", "參數量", "敏感度（陽性中抓到幾成）與特異度，外加混淆矩陣"),
        "D",
        "陽性只佔 5% 時，全部猜陰性就有 95% 準確率。敏感度（recall）說明漏診多少，特異度說明誤報多少，"
        "兩個都要看；醫療情境通常更在意漏診。",
    ),
)


@checker("interview_quiz", "面試自我測驗", points=3.0)
def check_interview_quiz(answers):
    """Check the interview quiz of notebook 07.

    ``answers``: a dict ``{"q1": "A", ..., "q15": "B"}`` (letters for multiple choice, numbers
    for numeric questions) or a zero-argument function returning it.
    """
    return build_quiz_cases(answers, INTERVIEW_QUESTIONS)


# ---------------------------------------------------------------------------------------------
# The pitfall quiz of notebook 06: symptom -> mistake
# ---------------------------------------------------------------------------------------------

PITFALL_QUESTIONS: tuple[Question, ...] = (
    MultipleChoice(
        "q1", "輸入格式",
        "訓練時驗證集的 Recall@1 很好，換了一支評估程式重新載入 checkpoint 後卻掉到接近亂猜。最先要查什麼？",
        ("學習率", "模型太小", "評估時的影像前處理（尺寸、像素範圍、正規化）是否和訓練時一樣", "batch size"),
        "C",
        "權重沒變，變的是輸入。像素從 [-1, 1] 變成 [0, 1]、少了 mean/std 正規化，或裁切代替縮放，"
        "模型都不會報錯，只會安靜地變差。把訓練與推論共用同一個前處理函式，並在評估前比對輸入的統計量。",
    ),
    MultipleChoice(
        "q2", "特徵對齊",
        "CLIP 的損失一直停在 ln(B) 附近，幾乎不下降；印出 logits 發現全部落在 [-1, 1]。最可能的原因？",
        ("溫度太高：scale 固定成 1，softmax 幾乎是均勻分布，梯度很小", "學習率太小", "資料太多", "少了 dropout"),
        "A",
        "cosine 本身只在 [-1, 1]，不乘上夠大的 scale（CLIP 從 1/0.07 開始學），每一列的 softmax 都很平，"
        "正確配對拉不開。讓 logit_scale 可學（或設成合理的固定值），損失就會往下走。",
    ),
    MultipleChoice(
        "q3", "輸入格式",
        "merge_image_features 報錯：提示裡的 image placeholder 位置比影像特徵向量少。最可能發生了什麼？",
        ("projector 太小", "影像太亮", "學習率太大", "提示被截斷到 max_length 時切進了 image tokens"),
        "D",
        "一張圖要佔 N 個位置，截斷如果從右邊切到 image token 區段，數量就對不上。"
        "正確的做法是截斷文字（或加大長度上限），絕不切 image token；遇到不符就報錯，而不是默默錯位。",
    ),
    MultipleChoice(
        "q4", "輸入格式",
        "LLaVA 模型用 ChatML（<|im_start|>user ... <|im_end|>）訓練，推論時改用「Question: ... Answer:」的純文字提示，答案變差。原因？",
        ("語言模型太小", "對話模板和訓練時不一致：模型沒在這種格式下學過何時開始回答", "影像特徵錯了", "溫度太低"),
        "B",
        "模型學到的是「看到 <|im_start|>assistant 之後輸出答案，接著輸出 <|im_end|>」。"
        "換了格式，起點和結束的訊號都不見了。推論時用和訓練完全相同的模板函式產生提示。",
    ),
    MultipleChoice(
        "q5", "遮罩",
        "改變序列中較後面的一個 token，前面位置的輸出也跟著變了。這個 decoder 出了什麼問題？",
        ("權重共享太多", "學習率太大", "causal 遮罩缺少或方向反了：前面的位置看得到未來", "資料有重複"),
        "C",
        "生成用的 decoder 每個位置只能看自己和前面的 token。若遮罩缺少（或 True/False 的意思用反），"
        "訓練時模型可以偷看答案，損失很低，生成時卻沒有未來可看而表現很差。",
    ),
    MultipleChoice(
        "q6", "標籤",
        "LLaVA 的訓練 loss 降得很快，但模型回答時常把問題或系統提示原樣抄一遍。最可能的原因？",
        ("labels 沒把提示、image 與 padding 位置設成 -100，模型把力氣花在背提示上", "projector 用了 GELU",
         "batch 太大", "影像解析度太高"),
        "A",
        "labels 等於 input_ids 時，大部分被監督的位置是提示與模板，它們很好預測，loss 因此很快降低，"
        "回答的 token 只佔一小部分訊號。只保留回答 token 的 label，其他位置設成 -100。",
    ),
    MultipleChoice(
        "q7", "權重共享",
        "所有層共用一個 cross-attention 後參數少了很多，但 held-out 準確率比不共用低，而且訓練 loss 也比較高。最可能的解讀？",
        ("過擬合", "資料外洩", "遮罩反了", "共享過度限制了模型（欠擬合）：每層被迫用同一組注意力權重"),
        "D",
        "訓練 loss 也變高，代表問題出在容量而不是泛化。共享要配合任務：層與層需要看不同東西時，"
        "改成部分共享（例如只共享 K/V，或每 k 層共享一次），並和不共享的版本在相同設定下比較。",
    ),
    NumericQuestion(
        "q8", "輸入格式",
        "EfficientNet 的 7×7 特徵格子用 pool_image_tokens 縮成 3×3。提示裡要為每張圖預留幾個 image placeholder？",
        _pooled_image_tokens,
        "每個池化後的格子是一個 image token：3×3 = {value} 個。預留的數量必須和 projector 輸出的 token 數一致，"
        "訓練與推論也要用同一個格子大小。",
    ),
)


@checker("pitfall_quiz", "常見錯誤診斷測驗", points=2.0)
def check_pitfall_quiz(answers):
    """Check the symptom-to-mistake quiz of notebook 06.

    ``answers``: a dict ``{"q1": "B", ..., "q8": 9}`` or a zero-argument function returning it.
    """
    return build_quiz_cases(answers, PITFALL_QUESTIONS)


QUIZZES: dict[str, tuple[Question, ...]] = {"interview": INTERVIEW_QUESTIONS, "pitfalls": PITFALL_QUESTIONS}


def show_quiz(name: str) -> None:
    """Print the questions of the quiz ``name`` ("interview" or "pitfalls") for the learner."""
    if name not in QUIZZES:
        raise ValueError(f"unknown quiz {name!r}; use one of {', '.join(QUIZZES)}.")
    print(render_quiz(QUIZZES[name]))
