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
import math
import random

from lalora.errors import UserError

# (comparative for the larger value, comparative for the smaller value, minimum gap: in log10
# units, or in units of 50 degrees for temperature). Only clearly different pairs are asked.
_ATTRIBUTES: dict[str, tuple[str, str, float]] = {
    "mass": ("heavier", "lighter", 1.5),
    "speed": ("faster", "slower", 1.5),
    "size": ("bigger", "smaller", 1.5),
    "temperature": ("hotter", "colder", 1.5),
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

# property -> (things that have it, things that do not), space-separated
_PROPERTIES: dict[str, tuple[str, str]] = {
    "can fly": (
        (
            "sparrow eagle pigeon crow owl parrot bat bee butterfly mosquito fly wasp hawk "
            "falcon seagull swallow dragonfly moth robin duck goose airplane helicopter kite "
            "balloon drone jet glider hummingbird pelican"
        ),
        (
            "dog cat cow horse pig sheep goat rabbit mouse snake turtle frog elephant lion "
            "tiger bear fox wolf deer camel giraffe table chair rock car bus truck bicycle "
            "piano tractor house spoon book shoe lamp sofa brick hammer boat train worm snail"
        ),
    ),
    "is something you can eat": (
        (
            "apple banana bread cheese carrot potato rice pizza cookie orange grape sandwich "
            "tomato cake egg onion pear peach lettuce pasta soup yogurt cucumber muffin "
            "pancake plum cherry mango noodle biscuit"
        ),
        (
            "hammer chair table rock shoe sock book pencil phone lamp brick nail spoon bottle "
            "key coin window door bicycle car carpet pillow blanket candle glass mirror "
            "ladder helmet towel umbrella scissors"
        ),
    ),
    "lives in the sea": (
        (
            "shark whale dolphin octopus jellyfish starfish crab lobster seal squid tuna cod "
            "seahorse walrus stingray clam oyster shrimp sardine eel coral orca"
        ),
        (
            "lion tiger cow horse dog cat squirrel rabbit camel giraffe elephant deer fox "
            "wolf bear monkey kangaroo zebra goat sheep owl eagle parrot chicken mouse "
            "hamster gorilla"
        ),
    ),
    "is alive": (
        (
            "dog cat tree flower bird fish horse frog rabbit mouse snake spider ant tiger oak "
            "rose mushroom whale cow sheep bee worm owl duck fern cactus goat"
        ),
        (
            "rock chair table spoon car phone cup shoe brick coin hammer book lamp door "
            "window bottle clock pencil plate bucket kettle sofa stone nail shovel"
        ),
    ),
}

_PROPERTY_TEMPLATES = (
    "Of the {a} and the {b}, only the _ {p}.",
    "Between the {a} and the {b}, it is the _ that {p}.",
    "You are shown the {a} and the {b}; the _ {p}.",
)
_COMPARISON_TEMPLATES = (
    "Between the {a} and the {b}, the _ is {comp}.",
    "If you compare the {a} with the {b}, the _ is clearly {comp}.",
    "Everyone knows that of the {a} and the {b}, the _ is {comp}.",
    "Of these two, the {a} and the {b}, it is the _ that is {comp}.",
)


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
