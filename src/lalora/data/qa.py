"""Question-answering records to prompts: ARC (Challenge, Easy), OpenBookQA and BoolQ, as the
Laplace-LoRA paper prepares them (Yang et al., ICLR 2024).

- ARC and OpenBookQA: only questions with exactly four choices are kept (in every split); the
  choices are read by position (ARC labels some ``1``-``4``) and lettered A-D; each choice text
  is capitalised and ends with one ".". The answers are the next tokens " A" ... " D".
- BoolQ: "Answer the question with only True or False: {question} Context: {passage}", answers
  " False" and " True".

Records come from the official jsonl files (``{"id", "question": {"stem", "choices": [{"text",
"label"}]}, "answerKey"}``; BoolQ ``{"question", "passage", "answer": bool}``) or from the hub's
``datasets`` rows (ARC ``question`` a string and ``choices`` ``{"text": [...], "label": [...]}``;
OpenBookQA ``question_stem``); both shapes are read here. A malformed record raises
:class:`QAFormatError` naming ``where`` (file and line).
"""

from __future__ import annotations

from lalora.core.errors import UserError

MC_PROMPT = (
    "Select one of the choices that answers the following question: {question} Choices: "
    "{choices} Answer:"
)
BOOLQ_PROMPT = "Answer the question with only True or False: {question} Context: {passage}"
LETTERS = "ABCD"


def fill(template: str, part: str, keep: str, **values: str) -> tuple[str, tuple[int, int, str]]:
    """``template.format(**values)`` and the character span of ``values[part]`` in it, with
    ``keep``: the end of that span kept when a prompt must be shortened (``"end"``: its start
    is cut; ``"start"``: its end is cut). The prompt's other parts are never cut."""
    start = len(template[: template.index("{" + part + "}")].format(**values))
    return template.format(**values), (start, start + len(values[part]), keep)


class QAFormatError(UserError, ValueError):
    """A record lacks a field or has one of the wrong type: the message says where."""


def _field(record: dict, key: str, where: str) -> object:
    if key not in record:
        raise QAFormatError(f"{where}: missing field {key!r}")
    return record[key]


def _text(value: object, key: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise QAFormatError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return " ".join(value.split())


def choice_text(text: str) -> str:
    """Capitalised, with exactly one trailing "." added by the prompt (so none kept here)."""
    text = text.strip().rstrip(".").strip()
    return text[:1].upper() + text[1:]


def _question_and_choices(record: dict, where: str) -> tuple[str, list[str], list[str]]:
    """(question, choice texts, choice labels) from either record shape."""
    q = record.get("question")
    if isinstance(q, dict):  # official jsonl: {"stem", "choices": [{"text", "label"}]}
        stem = _text(_field(q, "stem", where), "question.stem", where)
        choices = _field(q, "choices", where)
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise QAFormatError(f"{where}: question.choices must be a list of objects")
        texts = [_text(_field(c, "text", where), "choice text", where) for c in choices]
        labels = [str(_field(c, "label", where)) for c in choices]
        return stem, texts, labels
    stem = _text(record.get("question_stem", q), "question", where)
    choices = _field(record, "choices", where)
    if not isinstance(choices, dict) or not {"text", "label"} <= set(choices):
        raise QAFormatError(f"{where}: choices must be {{'text': [...], 'label': [...]}}")
    texts = [_text(t, "choice text", where) for t in choices["text"]]
    return stem, texts, [str(x) for x in choices["label"]]


def four_choice_prompt(record: dict, where: str) -> tuple[str, str, int, tuple] | None:
    """(id, prompt, label index, cut) of an ARC or OpenBookQA record, or None when it does not
    have exactly four choices (the paper keeps only those); ``cut``: the question, whose start
    goes first when the prompt is too long (:func:`fill`)."""
    question, texts, labels = _question_and_choices(record, where)
    if len(texts) != 4:
        return None
    if len(set(labels)) != len(labels):
        raise QAFormatError(f"{where}: choice labels {labels} repeat a label")
    key = str(_field(record, "answerKey", where))
    if key not in labels:
        raise QAFormatError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
    choices = " ".join(f"{LETTERS[i]}. {choice_text(t)}." for i, t in enumerate(texts))
    prompt, cut = fill(MC_PROMPT, "question", "end", question=question, choices=choices)
    return str(record.get("id", where)), prompt, labels.index(key), cut


def boolq_prompt(record: dict, where: str) -> tuple[str, str, int, tuple]:
    """(id, prompt, label, cut) of a BoolQ record: label 1 for True; ``cut``: the passage, whose
    end goes first when the prompt is too long (the instruction and question stay whole)."""
    question = _text(_field(record, "question", where), "question", where)
    passage = _text(_field(record, "passage", where), "passage", where)
    answer = _field(record, "answer", where)
    if not isinstance(answer, bool):
        raise QAFormatError(f"{where}: field 'answer' must be true or false, got {answer!r}")
    prompt, cut = fill(BOOLQ_PROMPT, "passage", "start", question=question, passage=passage)
    return str(record.get("idx", where)), prompt, int(answer), cut
