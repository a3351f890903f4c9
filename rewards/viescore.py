"""VIEScore and Weighted-Ref-VIEScore with a judge: the prompts, the answer parsers, per-case scoring.

The judge is anything with `complete_many(list of conversations) -> list[ChatResult | ChatError]`: the
OpenAI-compatible `omnilab.chat.ChatClient` (a hosted model, or an open VLM behind an OpenAI-compatible
server), or the in-process `rewards.judges.LocalVLMJudge`. The score formulas are `metrics/viescore.py`.

Prompts (kept word for word, so scores compare with the published ones):
- VIEScore (TIGER-AI-Lab/VIEScore `vie_prompts.py`, MIT licence; GEdit-Bench evaluates with its "tie" task):
  SC = context + two-image-edit rules + the tie SC rules with the instruction, sent with [source, output];
  PQ = context + the PQ rules, sent with [output]. The answer is JSON {"score": [...], "reasoning": ...}.
- MICo-Bench (A113N-W3I/MICo-150K `MICo-Bench/eval_score.py`, `compute_weights.py`): SC with
  [reference, output] and the prompt (the `refined_prompt` for De&Re); PQ with [output] (VIEScore's PQ rules
  without the JSON context: the answer's first two-number list is read, as the official parser does); and
  per non-human source the yes/no question "Does the element from Image 1 appear in Image 2?" with
  [source, output]. The text goes first and the images after it, as both official scripts send them.

A case never crashes a run and never scores a silent zero: an answer that is not JSON (and holds no score
list), has the wrong number of scores or scores outside 0-10 (`AnswerError`), a judge that times out or
fails (`ChatError`), a missing image or a face model that fails are recorded in the case's `status` and
`error`, and the case is left out of the means (the official MICo script does the same with unscored
cases) and counted.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from metrics.viescore import (
    CURRENT_VERSION,
    ScoreError,
    check_scores,
    check_version,
    face_score,
    preservation_weight,
    viescore,
    weighted_ref_final,
)
from omnilab.chat import ChatError, ChatResult, Message, user_message

# --------------------------------------------------------------------------- prompts

VIESCORE_CONTEXT = """You are a professional digital artist. You will have to evaluate the effectiveness of the AI-generated image(s) based on given rules.
All the input images are AI-generated. All human in the images are AI-generated too. so you need not worry about the privacy confidentials.

You will have to give your output in this way (Keep your reasoning concise and short.):
{
"score" : [...],
"reasoning" : "..."
}"""

TWO_IMAGE_EDIT_RULE = """RULES:

Two images will be provided: The first being the original AI-generated image and the second being an edited version of the first.
The objective is to evaluate how successfully the editing instruction has been executed in the second image.

Note that sometimes the two images might look identical due to the failure of image edit.
"""

TIE_SC_RULE = """
From scale 0 to 10: 
A score from 0 to 10 will be given based on the success of the editing. (0 indicates that the scene in the edited image does not follow the editing instruction at all. 10 indicates that the scene in the edited image follow the editing instruction text perfectly.)
A second score from 0 to 10 will rate the degree of overediting in the second image. (0 indicates that the scene in the edited image is completely different from the original. 10 indicates that the edited image can be recognized as a minimal edited yet effective version of original.)
Put the score in a list such that output score = [score1, score2], where 'score1' evaluates the editing success and 'score2' evaluates the degree of overediting.

Editing instruction: <instruction>
"""  # noqa: W291

ONE_IMAGE_GEN_RULE = """RULES:

The image is an AI-generated image according to the text prompt.
The objective is to evaluate how successfully the image has been generated.
"""

T2I_SC_RULE = """From scale 0 to 10: 
A score from 0 to 10 will be given based on the success in following the prompt. 
(0 indicates that the AI generated image does not follow the prompt at all. 10 indicates the AI generated image follows the prompt perfectly.)

Put the score in a list such that output score = [score].

Text Prompt: <prompt>
"""  # noqa: W291

PQ_RULE = """RULES:

The image is an AI-generated image.
The objective is to evaluate how successfully the image has been generated.

From scale 0 to 10: 
A score from 0 to 10 will be given based on image naturalness. 
(
    0 indicates that the scene in the image does not look natural at all or give a unnatural feeling such as wrong sense of distance, or wrong shadow, or wrong lighting. 
    10 indicates that the image looks natural.
)
A second score from 0 to 10 will rate the image artifacts. 
(
    0 indicates that the image contains a large portion of distortion, or watermark, or scratches, or blurred faces, or unusual body parts, or subjects not harmonized. 
    10 indicates the image has no artifacts.
)
Put the score in a list such that output score = [naturalness, artifacts]
"""  # noqa: W291

# MICo-Bench's PQ prompt is VIEScore's PQ rules without the trailing spaces and the final newline
MICO_PQ_PROMPT = "\n".join(line.rstrip() for line in PQ_RULE.splitlines())

MICO_SC_PROMPT = """You are a professional digital artist. You will have to evaluate the effectiveness of the AI-generated image based on given rules.
All the input images are AI-generated. All human in the images are AI-generated too. so you need not worry about the privacy confidentials.

RULES of image generation task:
The AI is required to generate an image that contains specific elements such as people, scenes, clothing, and objects.

RULES of the set of inputs:

2 images will be provided:
The first image is a reference image that successfully contains all the required specific elements.
The second image is the image to be evaluated. It should be similar to the reference image in terms of people, scenes, clothing, and objects.

From scale 0 to 10:
A score from 0 to 10 will be given based on the success in following the prompt.
(0 indicates that the second image does not follow the prompt at all. 10 indicates the second image follows the prompt perfectly.)
A second score from 0 to 10 will rate how well the generated image matches the reference image in people, scenes, clothing, and objects.
(0 means there is no resemblance at all, while 10 means all elements closely match those in the preceding images.)
Put the score in a list such that output score = [score1, score2], where 'score1' evaluates the prompt and 'score2' evaluates the resemblance.

Text Prompt:
{prompt}"""

MICO_ELEMENT_PROMPT = """Given two images:
- Image 1 is a source image containing a specific element.
- Image 2 is an AI-generated composite image.

Does the element from Image 1 appear in Image 2?
Answer only "yes" or "no"."""

DELIMITER = "||V^=^V||"


def edit_sc_prompt(instruction: str) -> str:
    """VIEScore's "tie" SC prompt for one instruction (GEdit-Bench)."""
    return "\n".join([VIESCORE_CONTEXT, TWO_IMAGE_EDIT_RULE, TIE_SC_RULE]).replace(
        "<instruction>", instruction
    )


def t2i_sc_prompt(prompt: str) -> str:
    """VIEScore's text-to-image SC prompt for one prompt."""
    return "\n".join([VIESCORE_CONTEXT, ONE_IMAGE_GEN_RULE, T2I_SC_RULE]).replace("<prompt>", prompt)


PQ_PROMPT = "\n".join([VIESCORE_CONTEXT, PQ_RULE])


# --------------------------------------------------------------------------- parsing


class AnswerError(ValueError):
    """A judge's answer that cannot be scored; `kind` is "not_json", "wrong_count", "out_of_range" or "bad_answer"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


NUMBER_LIST = re.compile(r"\[\s*(-?\d+(?:\.\d+)?(?:\s*,\s*-?\d+(?:\.\d+)?)*)\s*\]")


def _json_scores(text: str) -> list[Any] | None:
    """The "score" entry of the JSON object in an answer (between VIEScore's delimiters, in ``` fences, or the
    outermost braces), or None when no such object parses."""
    body = text
    if body.count(DELIMITER) == 2:
        body = body.split(DELIMITER)[1]
    start, end = body.find("{"), body.rfind("}")
    if start == -1 or end <= start:
        return None
    try:
        data = json.loads(body[start : end + 1])
    except ValueError:
        return None
    if not isinstance(data, dict) or "score" not in data:
        return None
    score = data["score"]
    return score if isinstance(score, list) else [score]


def parse_scores(text: str, count: int) -> list[float]:
    """The `count` scores (0-10) of a judge's answer; AnswerError saying why it cannot be scored.

    Read as VIEScore's parser reads: the JSON object's "score" (a number becomes a one-element list); failing
    that, as MICo-Bench's parser reads: the first bracketed list of `count` numbers anywhere in the text.
    """
    scores = _json_scores(text)
    if scores is None:
        for match in NUMBER_LIST.finditer(text):
            numbers = [float(x) for x in match.group(1).split(",")]
            if len(numbers) == count:
                scores = numbers
                break
    if scores is None:
        raise AnswerError("not_json", f"no JSON score object or [{count} numbers] list in {text[:160]!r}")
    if not all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores):
        raise AnswerError("not_json", f"the scores {scores!r} are not all numbers")
    if len(scores) != count:
        raise AnswerError("wrong_count", f"expected {count} scores, got {scores}")
    try:
        return check_scores(scores, count)
    except ScoreError as err:
        raise AnswerError("out_of_range", str(err)) from err


def parse_yes_no(text: str) -> bool:
    """True for "yes", False for "no" (MICo's `parse_vlm_yes_no`); AnswerError("bad_answer") when neither or both.

    The official script scores an unreadable answer as "no"; here it is recorded as a failure instead.
    """
    t = text.strip().lower()
    yes, no = re.search(r"\byes\b", t) is not None, re.search(r"\bno\b", t) is not None
    if yes != no:
        return yes
    if ("yes" in t) != ("no" in t):
        return "yes" in t
    raise AnswerError("bad_answer", f"neither a clear yes nor a clear no: {text[:80]!r}")


# --------------------------------------------------------------------------- judges


class Judge(Protocol):
    """What a judge offers: answers to conversations, in order, each a ChatResult or a ChatError."""

    model_id: str
    stats: dict[str, int]

    def complete_many(self, requests: Sequence[list[Message]]) -> list[ChatResult | ChatError]:
        """Answer each conversation (a list of messages with text and data-URL images)."""
        ...


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One benchmark case to score: the instruction, the source images, the output, the reference (MICo).

    Images are anything `omnilab.chat.encode_image` takes (tensors in [-1, 1], uint8 arrays, PIL, bytes); a
    missing one is None (the case is recorded as "missing_image"). `human` lists the sources that are human
    portraits (MICo's `human_indices`); `human_centric` selects v1 / v2's stricter face threshold.
    """

    case_id: str
    instruction: str
    sources: list[Any]
    output: Any
    reference: Any = None
    human: list[int] = field(default_factory=list)
    human_centric: bool = False


FaceFn = Callable[[list[Any], Any], list[float]]  # (human source images, output) -> best cosine per source


def _answer(results: list[ChatResult | ChatError], i: int, count: int | None) -> tuple[Any, str | None, str]:
    """(parsed scores or yes/no, failure kind or None, raw text) of answer i."""
    result = results[i]
    if isinstance(result, ChatError):
        return None, result.kind, str(result)
    try:
        value: Any = parse_scores(result.text, count) if count is not None else parse_yes_no(result.text)
    except AnswerError as err:
        return None, err.kind, result.text
    return value, None, result.text


class EditScorer:
    """VIEScore for single-image editing (GEdit-Bench): SC from [source, output], PQ from [output].

    Args:
        judge: The judge (`Judge`).
        max_side: Images are downscaled to this longer side before they are sent (None: as they are).
        resize_output_to_source: Resize the output to the source's size first (GEdit's `test_gedit_score.py`).
    """

    names = ("sc", "pq", "o")

    def __init__(
        self, judge: Judge, max_side: int | None = 1024, resize_output_to_source: bool = True
    ) -> None:
        self.judge, self.max_side, self.resize = judge, max_side, resize_output_to_source

    def judge_for(self, request: int) -> Judge:
        """The judge of a case's request number `request` (one judge for all)."""
        return self.judge

    def requests(self, case: Case) -> list[list[Message]]:
        """[SC conversation, PQ conversation] of one case."""
        source, output = case.sources[0], case.output
        if self.resize:
            output = _resize_like(output, source)
        sc = user_message(edit_sc_prompt(case.instruction), [source, output], max_side=self.max_side)
        pq = user_message(PQ_PROMPT, [output], max_side=self.max_side)
        return [[sc], [pq]]

    def score(self, cases: Sequence[Case]) -> list[dict[str, Any]]:
        """One record per case: {"status", "error", "sc", "pq", "o", "sc_scores", "pq_scores", "answers"}."""
        return _score_cases(self, cases)

    def finish(self, case: Case, results: list[ChatResult | ChatError]) -> dict[str, Any]:
        """The record of one case from its two answers."""
        sc, sc_fail, sc_text = _answer(results, 0, 2)
        pq, pq_fail, pq_text = _answer(results, 1, 2)
        record: dict[str, Any] = {"answers": {"sc": sc_text, "pq": pq_text}, "sc_scores": sc, "pq_scores": pq}
        if sc_fail or pq_fail:
            return {**record, "status": sc_fail or pq_fail, "error": sc_text if sc_fail else pq_text}
        s = viescore(sc, pq)
        return {**record, "status": "ok", "error": None, "sc": s.sc, "pq": s.pq, "o": s.o}


class WeightedRefScorer:
    """MICo's Weighted-Ref-VIEScore: SC and PQ from the judge, W from faces (human sources) and yes/no (others).

    Args:
        judge: The judge of SC and PQ (`Judge`); MICo-Bench uses gpt-5.4.
        faces: (human source images, output) -> the best ArcFace cosine of each source in the output
            (`rewards.faces.FaceMatcher`); needed when a case has human sources and `weight` is "official".
        version: The Weighted-Ref-VIEScore definition (`metrics.viescore.VERSIONS`; default the current one).
        weight: "official" (faces + yes/no), "vlm" (yes/no for every source, faces included) or "one"
            (W = 1, eval_score.py's --weight_all_one).
        max_side: Images are downscaled to this longer side before they are sent (None: as they are).
        element_judge: The judge of the yes/no element checks (MICo-Bench's `compute_weights.py` uses a local
            Qwen3-VL-30B-A3B); None: `judge`.
    """

    names = ("weight", "sc", "pq", "final")

    def __init__(
        self,
        judge: Judge,
        faces: FaceFn | None = None,
        version: str = CURRENT_VERSION,
        weight: str = "official",
        max_side: int | None = 1024,
        element_judge: Judge | None = None,
    ) -> None:
        if weight not in ("official", "vlm", "one"):
            raise ValueError(f"weight {weight!r}: choose official, vlm or one")
        self.judge, self.faces, self.version = judge, faces, check_version(version)
        self.weight, self.max_side, self.element_judge = weight, max_side, element_judge or judge

    def judge_for(self, request: int) -> Judge:
        """Requests 0 and 1 (SC, PQ) go to `judge`, the yes/no checks to `element_judge`."""
        return self.judge if request < 2 else self.element_judge

    def _elements(self, case: Case) -> list[int]:
        """The sources checked by the VLM's yes/no (all but the human ones, unless weight is "vlm")."""
        if self.weight == "one":
            return []
        if self.weight == "vlm":
            return list(range(len(case.sources)))
        return [i for i in range(len(case.sources)) if i not in set(case.human)]

    def requests(self, case: Case) -> list[list[Message]]:
        """[SC, PQ, one yes/no per element source] conversations of one case."""
        out = [
            [user_message(MICO_SC_PROMPT.format(prompt=case.instruction), [case.reference, case.output],
                          max_side=self.max_side)],
            [user_message(MICO_PQ_PROMPT, [case.output], max_side=self.max_side)],
        ]  # fmt: skip
        for i in self._elements(case):
            out.append(
                [user_message(MICO_ELEMENT_PROMPT, [case.sources[i], case.output], max_side=self.max_side)]
            )
        return out

    def score(self, cases: Sequence[Case]) -> list[dict[str, Any]]:
        """One record per case: status, error, weight, sc, pq, final, the sub-scores, element and face scores."""
        return _score_cases(self, cases)

    def finish(self, case: Case, results: list[ChatResult | ChatError]) -> dict[str, Any]:
        """The record of one case from its answers (SC, PQ, the yes/no checks) and the face scores."""
        sc, sc_fail, sc_text = _answer(results, 0, 2)
        pq, pq_fail, pq_text = _answer(results, 1, 2)
        record: dict[str, Any] = {
            "version": self.version,
            "answers": {"sc": sc_text, "pq": pq_text},
            "sc_scores": sc,
            "pq_scores": pq,
        }
        elements: dict[int, float] = {}
        failure: tuple[str, str] | None = None
        if sc_fail or pq_fail:
            failure = (sc_fail or pq_fail, sc_text if sc_fail else pq_text)  # type: ignore[assignment]
        for j, i in enumerate(self._elements(case)):
            found, fail, text = _answer(results, 2 + j, None)
            record["answers"][f"source{i}"] = text
            if fail and failure is None:
                failure = (fail, text)
            elements[i] = float(found) if found is not None else math.nan
        faces: list[float] = []
        human = [i for i in case.human if i not in elements] if self.weight == "official" else []
        if human and failure is None:
            if self.faces is None:
                failure = (
                    "face_error",
                    "the case has human sources but no face model is configured (faces:)",
                )
            else:
                try:
                    faces = [float(c) for c in self.faces([case.sources[i] for i in human], case.output)]
                except Exception as err:  # a face model failure is this case's, not the run's
                    failure = ("face_error", f"{type(err).__name__}: {err}")
            for i, cosine in zip(human, faces):
                elements[i] = face_score(cosine, self.version, case.human_centric)
        record["face_cosines"] = dict(zip(map(str, human), faces))
        record["elements"] = {str(i): s for i, s in sorted(elements.items())}
        if failure is not None:
            return {**record, "status": failure[0], "error": failure[1]}
        weight = 1.0 if self.weight == "one" else preservation_weight([elements[i] for i in sorted(elements)])
        sc_value, pq_value = math.sqrt(sc[0] * sc[1]), math.sqrt(pq[0] * pq[1])
        final = weighted_ref_final(weight, sc_value, pq_value, self.version)
        return {**record, "status": "ok", "error": None, "weight": weight, "sc": sc_value, "pq": pq_value,
                "final": final}  # fmt: skip


def _score_cases(scorer: EditScorer | WeightedRefScorer, cases: Sequence[Case]) -> list[dict[str, Any]]:
    """Every request of every case, sent to its judge in one `complete_many` call per judge (so each judge
    answers them concurrently; two judges run side by side)."""
    records: list[dict[str, Any] | None] = [None] * len(cases)
    spans: list[tuple[int, list[tuple[int, int]]]] = []
    queues: dict[int, tuple[Judge, list[list[Message]]]] = {}
    for k, case in enumerate(cases):
        missing = _missing(case, scorer)
        if missing:
            records[k] = {"status": "missing_image", "error": missing}
            continue
        slots = []
        for j, messages in enumerate(scorer.requests(case)):
            judge = scorer.judge_for(j)
            queue = queues.setdefault(id(judge), (judge, []))[1]
            slots.append((id(judge), len(queue)))
            queue.append(messages)
        spans.append((k, slots))
    answers: dict[int, list[ChatResult | ChatError]] = {}
    if len(queues) > 1:
        with ThreadPoolExecutor(max_workers=len(queues)) as pool:
            futures = {key: pool.submit(judge.complete_many, queue) for key, (judge, queue) in queues.items()}
            answers = {key: future.result() for key, future in futures.items()}
    else:
        answers = {key: judge.complete_many(queue) for key, (judge, queue) in queues.items()}
    for k, slots in spans:
        records[k] = scorer.finish(cases[k], [answers[key][i] for key, i in slots])
    return records  # type: ignore[return-value]


def _missing(case: Case, scorer: Any) -> str | None:
    """What image a case lacks (a reason), or None."""
    if case.output is None:
        return "no output image"
    missing = [i for i, s in enumerate(case.sources) if s is None]
    if missing or not case.sources:
        return f"source image(s) {missing} missing" if missing else "no source image"
    if isinstance(scorer, WeightedRefScorer) and case.reference is None:
        return "no reference image"
    return None


def _resize_like(image: Any, like: Any) -> Any:
    """`image` resized (bicubic) to the size of `like`, both as PIL images (GEdit resizes the output so)."""
    from PIL import Image

    from omnilab.chat import decode_image, encode_image

    a, b = decode_image(encode_image(image)), decode_image(encode_image(like))
    return a if a.size == b.size else a.resize(b.size, Image.BICUBIC)
