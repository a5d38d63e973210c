"""Datasets, prompt templates and the generated default task.

A prepared example is a :class:`Example`: a prompt string and the index of the true answer among
the dataset's answer strings (" A", " B" for WinoGrande). Sources:

- ``generated``: a seeded commonsense-comparison task the project builds itself, in WinoGrande's
  format (a sentence with one blank, two options). Its answers need world knowledge (which of two
  things is heavier, faster, hotter, bigger), train and test use disjoint entities, so a model
  cannot memorise its way to 100%.
- ``local``: a folder of the official WinoGrande jsonl files (``train_s.jsonl``, ``dev.jsonl``).
- ``hub``: ``allenai/winogrande`` through HuggingFace ``datasets``.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from lalora.config import DataConfig

WINOGRANDE_PROMPT = (
    "Select one of the choices that answers the following question: {sentence} "
    "Choices: A. {option1}. B. {option2}. Answer:"
)
AB_ANSWERS = (" A", " B")


class DataError(ValueError):
    """Input data is missing or malformed: the message says where."""


@dataclass(frozen=True)
class Example:
    """One prepared multiple-choice example."""

    id: str
    prompt: str
    label: int


@dataclass(frozen=True)
class Split:
    """Prepared examples plus the answer strings whose next-token logits form the classifier."""

    examples: tuple[Example, ...]
    answers: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# WinoGrande-format records


def winogrande_prompt(record: dict, where: str) -> Example:
    """Turn one WinoGrande record into an :class:`Example`, checking its fields."""
    for key in ("sentence", "option1", "option2", "answer"):
        if key not in record:
            raise DataError(f"{where}: missing field {key!r}")
    sentence = str(record["sentence"])
    if sentence.count("_") != 1:
        raise DataError(f"{where}: sentence must contain exactly one '_': {sentence!r}")
    answer = str(record["answer"])
    if answer not in ("1", "2"):
        raise DataError(f"{where}: answer must be '1' or '2', got {answer!r}")
    prompt = WINOGRANDE_PROMPT.format(
        sentence=sentence, option1=record["option1"], option2=record["option2"]
    )
    return Example(id=str(record.get("qID", where)), prompt=prompt, label=int(answer) - 1)


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-empty line; bad JSON names file and line."""
    with path.open() as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{i}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{i}: expected a JSON object")
            yield i, record


def load_winogrande_local(folder: Path, split: str) -> list[Example]:
    """Read ``{folder}/{split}.jsonl`` (official WinoGrande v1.1 files)."""
    if not folder.is_dir():
        raise DataError(f"local WinoGrande folder not found: looked in {folder.resolve()}")
    path = folder / f"{split}.jsonl"
    if not path.exists():
        raise DataError(f"WinoGrande split {split!r} not found: looked for {path.resolve()}")
    return [winogrande_prompt(r, f"{path}:{i}") for i, r in read_jsonl(path)]


def load_winogrande_hub(split: str) -> list[Example]:
    """Load a split from the hub: ``train_s`` -> config ``winogrande_s`` split ``train``, ``dev``
    -> the validation split (identical across configs)."""
    import datasets

    size = split.removeprefix("train_") if split.startswith("train_") else "xl"
    hub_split = "train" if split.startswith("train_") else "validation"
    ds = datasets.load_dataset("allenai/winogrande", f"winogrande_{size}", split=hub_split)
    return [winogrande_prompt(r, f"allenai/winogrande[{hub_split}]:{i}") for i, r in enumerate(ds)]


# ---------------------------------------------------------------------------------------------
# The generated default task: commonsense comparisons that need world knowledge.

# (comparative for the larger value, comparative for the smaller value, minimum log10 gap)
_ATTRIBUTES: dict[str, tuple[str, str, float]] = {
    "mass": ("heavier", "lighter", 0.5),
    "speed": ("faster", "slower", 0.5),
    "size": ("bigger", "smaller", 0.5),
    "temperature": ("hotter", "colder", 0.6),
}
# Typical values: kilograms, km/h, metres, degrees Celsius (rough, common-knowledge orders).
_ENTITIES: dict[str, dict[str, float]] = {
    "mass": {
        "ant": 3e-6,
        "bee": 1e-4,
        "mouse": 0.02,
        "sparrow": 0.03,
        "hamster": 0.1,
        "rat": 0.3,
        "squirrel": 0.5,
        "pigeon": 0.4,
        "rabbit": 2,
        "cat": 4,
        "chicken": 2.5,
        "fox": 6,
        "dog": 20,
        "goat": 50,
        "sheep": 70,
        "wolf": 40,
        "deer": 100,
        "pig": 150,
        "lion": 190,
        "tiger": 220,
        "gorilla": 160,
        "horse": 500,
        "cow": 700,
        "bear": 300,
        "camel": 500,
        "giraffe": 1000,
        "rhinoceros": 2300,
        "hippopotamus": 1500,
        "elephant": 5000,
        "blue whale": 1e5,
        "frog": 0.05,
        "snail": 0.01,
        "butterfly": 5e-4,
        "eagle": 5,
        "penguin": 25,
        "kangaroo": 60,
        "zebra": 350,
        "moose": 500,
        "crocodile": 500,
        "shark": 900,
        "dolphin": 150,
        "ostrich": 100,
        "owl": 1.5,
        "duck": 1.2,
        "goose": 4,
        "turkey": 8,
        "donkey": 250,
        "bison": 900,
        "panda": 100,
        "koala": 10,
        "monkey": 8,
        "parrot": 0.5,
        "spider": 1e-3,
        "worm": 3e-3,
        "lobster": 1,
        "mosquito": 2e-6,
        "hummingbird": 4e-3,
        "beetle": 2e-3,
        "seal": 150,
        "walrus": 1200,
    },
    "speed": {
        "snail": 0.05,
        "turtle": 0.3,
        "sloth": 0.2,
        "worm": 0.01,
        "caterpillar": 0.03,
        "cheetah": 110,
        "racehorse": 70,
        "greyhound": 65,
        "hare": 60,
        "bicycle": 20,
        "car": 120,
        "airplane": 850,
        "rocket": 25000,
        "train": 200,
        "rowing boat": 6,
        "skateboard": 15,
        "scooter": 30,
        "motorcycle": 150,
        "helicopter": 250,
        "jet": 900,
        "tractor": 30,
        "bus": 80,
        "truck": 90,
        "canoe": 7,
        "sailboat": 15,
        "wheelchair": 6,
        "bullet train": 300,
        "speedboat": 90,
        "glider": 100,
        "falcon": 300,
        "ostrich": 70,
        "pedestrian": 5,
        "jogger": 10,
        "sprinter": 35,
        "tortoise": 0.3,
        "ant": 0.1,
        "elephant": 25,
        "pig": 15,
        "cow": 20,
        "chicken": 14,
        "duck": 10,
        "penguin": 8,
        "snake": 10,
        "lion": 80,
        "antelope": 90,
        "race car": 330,
        "horse cart": 12,
        "space shuttle": 28000,
        "hot air balloon": 20,
        "ferry": 40,
        "cruise ship": 40,
        "starfish": 0.01,
        "slug": 0.02,
        "koala": 5,
        "sailfish": 100,
    },
    "size": {
        "ant": 0.003,
        "coin": 0.02,
        "pencil": 0.18,
        "book": 0.25,
        "chair": 1,
        "door": 2,
        "car": 4.5,
        "bus": 12,
        "house": 10,
        "oak tree": 20,
        "cathedral": 100,
        "skyscraper": 300,
        "mountain": 4000,
        "planet": 1e7,
        "grain of sand": 5e-4,
        "button": 0.015,
        "marble": 0.015,
        "shoe": 0.3,
        "laptop": 0.35,
        "bicycle": 1.8,
        "sofa": 2,
        "piano": 1.5,
        "truck": 15,
        "airliner": 60,
        "cargo ship": 300,
        "bridge": 1000,
        "stadium": 250,
        "tennis ball": 0.07,
        "football": 0.22,
        "cup": 0.1,
        "spoon": 0.15,
        "bed": 2,
        "apple": 0.08,
        "watermelon": 0.3,
        "grape": 0.02,
        "pea": 0.008,
        "canoe": 5,
        "key": 0.06,
        "ring": 0.02,
        "phone": 0.15,
        "refrigerator": 1.8,
        "city": 20000,
        "moon": 3.5e6,
        "star": 1.4e9,
        "island": 5000,
        "lake": 3000,
        "pond": 30,
        "puddle": 1,
        "ocean": 5e6,
        "village": 1000,
        "atom": 1e-10,
        "cell": 1e-5,
        "feather": 0.1,
        "pebble": 0.03,
        "boulder": 2,
        "castle": 150,
        "tent": 3,
        "wardrobe": 2,
        "envelope": 0.2,
    },
    "temperature": {
        "ice cube": -5,
        "snow": -5,
        "lava": 1100,
        "boiling water": 100,
        "hot coffee": 70,
        "surface of the sun": 5500,
        "freezer": -18,
        "hot oven": 220,
        "candle flame": 1000,
        "hot soup": 70,
        "ice cream": -10,
        "glacier": -10,
        "desert sand at noon": 60,
        "warm bath": 38,
        "cup of tea": 70,
        "refrigerator": 4,
        "iceberg": -15,
        "campfire": 700,
        "steam": 110,
        "frozen lake": -5,
        "sauna": 85,
        "volcano": 1000,
        "stove burner": 400,
        "popsicle": -10,
        "human body": 37,
        "snowman": -2,
        "hot chocolate": 60,
        "iced tea": 5,
        "lightning bolt": 30000,
        "molten steel": 1500,
        "arctic wind": -30,
        "hot spring": 45,
        "frost": -3,
        "cold soda": 4,
        "toaster": 250,
        "blizzard": -20,
        "polar night": -40,
        "fresh bread": 50,
        "welding torch": 3000,
        "spring water": 10,
        "winter morning": -5,
        "summer afternoon": 32,
        "ice rink": -5,
        "pizza oven": 400,
        "frozen peas": -18,
        "boiling oil": 180,
        "igloo": -5,
        "fireplace": 600,
        "hailstone": -5,
        "coal fire": 900,
        "cold shower": 15,
        "liquid nitrogen": -196,
        "dry ice": -78,
        "hairdryer air": 60,
        "glass of milk": 5,
    },
}
_TEMPLATES = (
    "Between the {a} and the {b}, the _ is {comp}.",
    "If you compare the {a} with the {b}, the _ is clearly {comp}.",
    "Everyone knows that of the {a} and the {b}, the _ is {comp}.",
    "Of these two, the {a} and the {b}, it is the _ that is {comp}.",
)


def _gap(attribute: str, x: float, y: float) -> float:
    """How clearly two values differ: log10 ratio (or degrees/50 for temperature)."""
    if attribute == "temperature":
        return abs(x - y) / 50.0
    return abs(math.log10(x) - math.log10(y))


def _comparisons(attribute: str, names: list[str], rng: random.Random) -> list[dict]:
    big, small, min_gap = _ATTRIBUTES[attribute]
    values = _ENTITIES[attribute]
    records = []
    for x, y in itertools.combinations(names, 2):
        if _gap(attribute, values[x], values[y]) <= min_gap:
            continue
        comp = rng.choice((big, small))
        larger = x if values[x] > values[y] else y
        target = larger if comp == big else (y if larger == x else x)
        a, b = (x, y) if rng.random() < 0.5 else (y, x)
        sentence = rng.choice(_TEMPLATES).format(a=a, b=b, comp=comp)
        records.append(
            {
                "sentence": sentence,
                "option1": a,
                "option2": b,
                "answer": "1" if target == a else "2",
            }
        )
    return records


def generate_comparisons(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """The generated task as WinoGrande-format records ``(train, test)``.

    Per attribute, entities are split in two disjoint halves (seeded): train pairs come from one
    half, test pairs from the other. Records are shuffled and truncated to the sizes asked for.
    """
    rng = random.Random(seed)
    train: list[dict] = []
    test: list[dict] = []
    for attribute in _ATTRIBUTES:
        names = sorted(_ENTITIES[attribute])
        rng.shuffle(names)
        half = len(names) // 2
        train += _comparisons(attribute, names[:half], rng)
        test += _comparisons(attribute, names[half:], rng)
    rng.shuffle(train)
    rng.shuffle(test)
    if len(train) < n_train or len(test) < n_test:
        raise DataError(
            f"the generated task has {len(train)} train / {len(test)} test pairs; "
            f"asked for {n_train} / {n_test}"
        )
    for prefix, records in (("train", train), ("test", test)):
        for i, r in enumerate(records):
            r["qID"] = f"gen-{prefix}-{i}"
    return train[:n_train], test[:n_test]


# ---------------------------------------------------------------------------------------------
# Registry and preparation

DATASETS = ("generated", "winogrande")


def load_splits(cfg: DataConfig, root: Path = Path(".")) -> tuple[list[Example], list[Example]]:
    """Load ``(train, test)`` examples for the configured dataset."""
    if cfg.name not in DATASETS:
        raise DataError(f"unknown dataset {cfg.name!r}; known: {list(DATASETS)}")
    if cfg.name == "generated":
        if cfg.source != "generated":
            raise DataError("dataset 'generated' needs source: generated")
        train, test = generate_comparisons(cfg.n_train, cfg.n_test, cfg.seed)
        return (
            [winogrande_prompt(r, f"generated train {i}") for i, r in enumerate(train)],
            [winogrande_prompt(r, f"generated test {i}") for i, r in enumerate(test)],
        )
    if cfg.source == "local":
        folder = root / cfg.local_dir
        return load_winogrande_local(folder, cfg.train_split), load_winogrande_local(
            folder, cfg.test_split
        )
    if cfg.source == "hub":
        return load_winogrande_hub(cfg.train_split), load_winogrande_hub(cfg.test_split)
    raise DataError(f"dataset {cfg.name!r} cannot be read from source {cfg.source!r}")


def split_validation(
    train: list[Example], val_size: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Carve a seeded validation split of ``val_size`` examples out of ``train``."""
    if val_size < 0 or val_size >= len(train):
        raise DataError(f"val_size must be in [0, {len(train)}), got {val_size}")
    order = list(range(len(train)))
    random.Random(seed + 1).shuffle(order)
    val_idx = set(order[:val_size])
    return (
        [e for i, e in enumerate(train) if i not in val_idx],
        [e for i, e in enumerate(train) if i in val_idx],
    )


def write_split(path: Path, examples: Iterable[Example], answers: tuple[str, ...]) -> None:
    """Write examples as jsonl (first line: the answer strings), atomically."""
    from lalora.io import atomic_write_text

    lines = [json.dumps({"answers": list(answers)})]
    lines += [json.dumps(asdict(e)) for e in examples]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_split(path: Path) -> Split:
    """Read a prepared split written by :func:`write_split`."""
    if not path.exists():
        raise DataError(f"prepared split not found: {path}")
    rows = list(read_jsonl(path))
    if not rows or "answers" not in rows[0][1]:
        raise DataError(f"{path}:1: expected a header line with 'answers'")
    answers = tuple(rows[0][1]["answers"])
    examples = []
    for i, r in rows[1:]:
        try:
            ex = Example(id=str(r["id"]), prompt=str(r["prompt"]), label=int(r["label"]))
        except KeyError as err:
            raise DataError(f"{path}:{i}: missing field {err}") from None
        if not 0 <= ex.label < len(answers):
            raise DataError(f"{path}:{i}: label {ex.label} out of range for {len(answers)} answers")
        examples.append(ex)
    return Split(examples=tuple(examples), answers=answers)
