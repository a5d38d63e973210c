"""The generated default task: seeded two-choice commonsense items in WinoGrande's format.

Each item is a sentence with one blank and two options; the answer needs world knowledge of one
of two kinds:

- *properties*: which of two things has a property ("Of the carrot and the hammer, only the _ is
  something you can eat."), one from a list of things that have it, one from a list that do not;
- *comparisons*: which of two things is larger on a scale ("Between the snail and the cheetah,
  the _ is faster."), pairs whose typical values differ by at least 1.5 orders of magnitude.

Every entity name is assigned, seeded, to train or to test once for the whole task, so no test
item mentions a name seen in training: a model must bring the knowledge (or learn a rule), it
cannot memorise its way to 100%. A quarter of each split are comparisons, the rest properties
(``COMPARISON_SHARE``). Fine-tuned SmolLM2-135M learns the properties far better than the
comparisons, so test accuracy sits well above chance and well below 100% (README, "The default
task").
"""

from __future__ import annotations

import itertools
import json
import math
import random
from importlib import resources

from lalora.core.errors import UserError


def _load_knowledge() -> dict:
    """The task's tables, shipped with the package (``resources/generated_task.json``):
    ``attributes`` {name: [comparative for the larger value, for the smaller, minimum gap in
    log10 units (in 50-degree units for temperature)]}, ``entities`` {attribute: {name: typical
    value}} (kilograms, km/h, metres, degrees Celsius: rough, common-knowledge orders),
    ``properties`` {property: [things that have it, things that do not]} (space-separated),
    and the sentence templates."""
    text = resources.files("lalora").joinpath("resources", KNOWLEDGE_FILE).read_text("utf-8")
    return json.loads(text)


KNOWLEDGE_FILE = "generated_task.json"
_KNOWLEDGE = _load_knowledge()
_ATTRIBUTES: dict[str, tuple[str, str, float]] = {
    k: tuple(v) for k, v in _KNOWLEDGE["attributes"].items()
}
_ENTITIES: dict[str, dict[str, float]] = _KNOWLEDGE["entities"]
_PROPERTIES: dict[str, tuple[str, str]] = {k: tuple(v) for k, v in _KNOWLEDGE["properties"].items()}
_PROPERTY_TEMPLATES = tuple(_KNOWLEDGE["property_templates"])
_COMPARISON_TEMPLATES = tuple(_KNOWLEDGE["comparison_templates"])


# The share of comparison items in each split; the rest are property items.
COMPARISON_SHARE = 0.25


class GenerationError(UserError, ValueError):
    """The generated task cannot supply the sizes asked for."""


def _gap(attribute: str, x: float, y: float) -> float:
    """How clearly two values differ: log10 ratio (or degrees/50 for temperature)."""
    if attribute == "temperature":
        return abs(x - y) / 50.0
    return abs(math.log10(x) - math.log10(y))


def _record(sentence: str, a: str, b: str, target: str) -> dict:
    return {"sentence": sentence, "option1": a, "option2": b, "answer": "1" if target == a else "2"}


def _comparisons(attribute: str, names: set[str], rng: random.Random) -> list[dict]:
    big, small, min_gap = _ATTRIBUTES[attribute]
    values = _ENTITIES[attribute]
    records = []
    for x, y in itertools.combinations(sorted(names & values.keys()), 2):
        if _gap(attribute, values[x], values[y]) <= min_gap:
            continue
        comp = rng.choice((big, small))
        larger, smaller = (x, y) if values[x] > values[y] else (y, x)
        a, b = (x, y) if rng.random() < 0.5 else (y, x)
        sentence = rng.choice(_COMPARISON_TEMPLATES).format(a=a, b=b, comp=comp)
        records.append(_record(sentence, a, b, larger if comp == big else smaller))
    return records


def _properties(prop: str, names: set[str], rng: random.Random) -> list[dict]:
    has, lacks = (set(words.split()) for words in _PROPERTIES[prop])
    records = []
    for x in sorted(names & has):
        for y in sorted(names & (lacks - has)):
            a, b = (x, y) if rng.random() < 0.5 else (y, x)
            sentence = rng.choice(_PROPERTY_TEMPLATES).format(a=a, b=b, p=prop)
            records.append(_record(sentence, a, b, x))
    return records


def entity_names() -> list[str]:
    """Every entity name the task uses, sorted."""
    names = {n for values in _ENTITIES.values() for n in values}
    names |= {n for pair in _PROPERTIES.values() for words in pair for n in words.split()}
    return sorted(names)


def split_entities(seed: int) -> tuple[set[str], set[str]]:
    """A seeded half/half split of :func:`entity_names` into (train, test) names."""
    names = entity_names()
    random.Random(seed).shuffle(names)
    half = len(names) // 2
    return set(names[:half]), set(names[half:])


def _take(
    properties: list[dict],
    comparisons: list[dict],
    n: int,
    comparison_share: float,
    rng: random.Random,
) -> list[dict]:
    n_prop = n - round(n * comparison_share)
    if len(properties) < n_prop or len(comparisons) < n - n_prop:
        raise GenerationError(
            f"the generated task has {len(properties)} property and {len(comparisons)} "
            f"comparison items for this split; asked for {n_prop} and {n - n_prop}"
        )
    records = rng.sample(properties, n_prop) + rng.sample(comparisons, n - n_prop)
    rng.shuffle(records)
    return records


def generate_task(
    n_train: int, n_test: int, seed: int, comparison_share: float = COMPARISON_SHARE
) -> tuple[list[dict], list[dict]]:
    """The generated task as WinoGrande-format records ``(train, test)``, a ``comparison_share``
    (a quarter) of comparison items and the rest property items in each, on disjoint entity
    names (:func:`split_entities`)."""
    rng = random.Random(seed)
    out = []
    for prefix, names, n in zip(
        ("train", "test"), split_entities(seed), (n_train, n_test), strict=True
    ):
        props = [r for p in _PROPERTIES for r in _properties(p, names, rng)]
        comps = [r for a in _ATTRIBUTES for r in _comparisons(a, names, rng)]
        records = _take(props, comps, n, comparison_share, rng)
        for i, r in enumerate(records):
            r["qID"] = f"gen-{prefix}-{i}"
        out.append(records)
    return out[0], out[1]
