"""The task sections: a dataset (``data.<name>``) and a custom dataset's schema."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from lalora.config.base import (
    ConfigError,
    _conf_defaults,
    check_plain_name,
)

# the answer strings (next tokens) each known dataset's classifier reads; a custom dataset's
# follow from its schema's number of choices (" A", " B", ...)
AB_ANSWERS = (" A", " B")
ABCD_ANSWERS = (" A", " B", " C", " D")
BOOL_ANSWERS = (" False", " True")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ANSWERS: dict[str, tuple[str, ...] | None] = {
    "generated": AB_ANSWERS,
    "custom": None,
    "winogrande": AB_ANSWERS,
    "arc_c": ABCD_ANSWERS,
    "arc_e": ABCD_ANSWERS,
    "obqa": ABCD_ANSWERS,
    "boolq": BOOL_ANSWERS,
}


@dataclass(frozen=True)
class SchemaConfig:
    """The fields of a custom multiple-choice dataset (``name: custom``): one record per
    question, with ``id`` (optional; else the file and line), ``question`` (a non-empty
    string), ``choices`` (one field holding the list of choice texts, or one field per choice)
    and ``answer`` (the true choice: a 0-based index, a letter ``A``, ``B``, ..., or the text of
    a choice). Every record has ``n_choices`` choices (2 to 26); the answers are the tokens
    " A", " B", ... . ``answer_format``: how an answer is read, ``index``, ``letter``,
    ``text``, or ``auto`` (any of them, and a value two readings give different choices, such as
    "2" among the choices "4", "2", "0", is refused naming its file and line). ``template``: the
    prompt, with ``{question}`` and ``{choices}`` (rendered "A. ... B. ..."; no other braces);
    empty: the ARC prompt. ``hub_id`` (and ``hub_config``): the HuggingFace dataset read with
    ``source: hub``; its split names are ``train_split`` and ``test_split``."""

    n_choices: int = 0
    id: str = "id"
    question: str = "question"
    choices: tuple[str, ...] = ("choices",)
    answer: str = "answer"
    answer_format: Literal["auto", "index", "letter", "text"] = "auto"
    template: str = ""
    hub_id: str = ""
    hub_config: str = ""

    def __post_init__(self) -> None:
        if self.n_choices and not 2 <= self.n_choices <= 26:
            raise ConfigError(f"schema.n_choices must be 2 to 26, got {self.n_choices}")
        if len(self.choices) not in (1, self.n_choices or 1) or not all(self.choices):
            raise ConfigError(
                f"schema.choices {list(self.choices)}: one field holding the list of choices, "
                f"or one field per choice ({self.n_choices})"
            )
        if self.template:
            fields = set(re.findall(r"{([^{}]*)}", self.template))
            if fields != {"question", "choices"}:
                raise ConfigError(
                    f"schema.template must contain {{question}} and {{choices}} and no other "
                    f"field, got {sorted(fields)}: {self.template!r}"
                )
            rest = re.sub(r"{(question|choices)}", "", self.template)
            if "{" in rest or "}" in rest:
                raise ConfigError(
                    f"schema.template {self.template!r}: braces other than {{question}} and "
                    "{choices} (such as {{ or }}) are not allowed in the prompt template"
                )


@dataclass(frozen=True)
@_conf_defaults("data", "generated")
class DataConfig:
    """The task: ``name`` is a key of :data:`lalora.data.datasets.DATASETS` (generated, winogrande,
    arc_c, arc_e, obqa, boolq, or custom: the user's own files or hub dataset, read as
    ``schema`` says, :class:`SchemaConfig`). For read datasets ``n_train``/``n_test`` examples
    are used (a seeded subset in file order when fewer than the split holds).

    ``source`` is ``generated`` (the project's own task), ``hub`` (HuggingFace ``datasets``) or
    ``local`` (a folder of the official files, ``local_dir``, relative to the project root,
    :func:`lalora.core.paths.resolve_dir`). ``val_size`` examples are carved from train (seeded) for
    prior tuning on validation NLL.

    Training on the test split is refused (``train_split == test_split``). Where one split is all
    there is (BoolQ's local ``dev``), ``split_from: dev`` draws train (``n_train``) and test
    (``n_test``) as a seeded, disjoint partition of it: a split of our own, not the benchmark's
    official protocol (``train_split`` and ``test_split`` are then not read).
    """

    name: str
    source: Literal["generated", "hub", "local"]
    local_dir: str
    train_split: str
    test_split: str
    n_train: int
    n_test: int
    val_size: int
    seed: int
    split_from: str
    schema: SchemaConfig = field(default_factory=SchemaConfig)
    # a prompt or id in two of train, val and test: refused (the default), or kept with a
    # warning where the benchmark's own splits share one (lalora.data.splits.check_leakage)
    leakage: Literal["refuse", "warn"] = "refuse"

    def __post_init__(self) -> None:
        for key in ("name", "train_split", "test_split"):
            check_plain_name(key, getattr(self, key))
        if (self.name == "custom") != bool(self.schema.n_choices):
            raise ConfigError(
                "a custom dataset (name: custom) needs schema.n_choices >= 2, and only a custom "
                f"dataset has a schema (name {self.name!r}, schema.n_choices "
                f"{self.schema.n_choices})"
            )
        if self.name == "custom" and self.source == "generated":
            raise ConfigError("name custom reads files (source: local) or the hub (source: hub)")
        if self.name == "custom" and self.source == "hub" and not self.schema.hub_id:
            raise ConfigError("schema.hub_id: a custom dataset from the hub needs its id")
        if self.split_from:
            check_plain_name("split_from", self.split_from)
            if self.source == "generated":
                raise ConfigError("split_from: the generated task has no splits to divide")
        elif self.source != "generated" and self.train_split == self.test_split:
            raise ConfigError(
                f"train_split and test_split are both {self.train_split!r}: that trains on the "
                f"test prompts. Name two splits, or set split_from: {self.train_split} for a "
                "seeded, disjoint split of it into n_train and n_test examples (not the "
                "official protocol)"
            )
        if self.source == "local" and not self.local_dir:
            raise ConfigError("local_dir: source 'local' needs the folder of the data files")
        if self.n_train < 1 or self.n_test < 1:
            raise ConfigError(
                f"n_train and n_test must be >= 1, got {self.n_train} and {self.n_test}"
            )
        if self.val_size < 0:
            raise ConfigError(f"val_size must be >= 0, got {self.val_size}")
        if self.source == "generated" and self.val_size >= self.n_train:
            raise ConfigError(
                f"val_size ({self.val_size}) must be smaller than n_train ({self.n_train}): "
                "the validation split is carved from the training items"
            )


def answers_of(dataset: str | DataConfig) -> tuple[str, ...]:
    """The answer strings (next tokens) of a dataset (a name, or a data config: a custom
    dataset's follow from its number of choices)."""
    if isinstance(dataset, DataConfig):
        if dataset.name == "custom":
            return tuple(f" {c}" for c in LETTERS[: dataset.schema.n_choices])
        dataset = dataset.name
    if dataset not in ANSWERS:
        raise ConfigError(f"unknown dataset {dataset!r}; known: {sorted(ANSWERS)}")
    answers = ANSWERS[dataset]
    if answers is None:
        raise ConfigError("a custom dataset's answers follow from its data config's schema")
    return answers
