"""The synthetic world behind the CPU demo: a pretraining corpus and two downstream tasks.

Everything here is a pure function of an integer seed and uses only ``random.Random`` (no numpy, no hashing of
Python objects), so the shipped files under ``demo/data`` can be rebuilt byte for byte:

    python scripts/make_demo_data.py --out demo/data

The world: objects with a colour, a size and a room; people with a job, a pet and a city; and small-number
arithmetic. The pretraining corpus states these facts in plain English ("The ball is red.", "3 + 4 = 7.",
"three plus four is seven.") and never in the downstream task form. The two tasks use the LLM-Adapters record
format (``instruction``, ``input`` = "", ``output``, ``answer``):

- ``demo_choice``: two-option yes/no questions about the world's facts ("Is the ball red? Option1: yes Option2:
  no Answer format: option1/option2"), answered "the correct answer is option1/2", like WinoGrande. Test
  questions ask about (entity, attribute) pairs that no training question asks about, so solving them needs the
  facts the frozen model learned in pretraining. (Options listing two values, "Option1: red Option2: blue", were
  tried first: the 2 M-parameter model could not learn to bind a value to its label in a few hundred steps.)
- ``demo_math``: one-step word problems, answered "3 + 4 = 7. The answer is 7.", like math_10k/50k.

The module is imported by ``scripts/make_demo_data.py``, ``scripts/pretrain_tiny_moe.py`` and
``tests/test_demo_assets.py`` (by file path: ``scripts/`` is not a package).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SEED = 1234

# ---------------------------------------------------------------------------------------------------------------
# The world's vocabulary (fixed); which entity gets which value is drawn from the seed.
OBJECTS = (
    "ball", "cup", "hat", "box", "book", "key", "lamp", "chair", "bag", "kite", "sock", "coat", "bell", "drum",
    "clock", "vase", "shoe", "rope", "bowl", "spoon", "brush", "doll", "boat", "pen", "mug", "fan", "rug", "desk",
    "cap", "fork", "jar", "kettle", "mirror", "pillow", "plate", "ring", "scarf", "sofa", "tent", "towel",
)  # fmt: skip
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "pink", "brown")
SIZES = ("big", "small")
ROOMS = ("kitchen", "garden", "bedroom", "hall", "garage", "attic", "office", "bathroom")
PEOPLE = (
    "Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Jack", "Emma", "Leo", "Lily", "Max", "Zoe", "Dan", "Ella",
    "Paul", "Rosa", "Nick", "Kate", "Hugo", "Ivy", "Alex", "Nora", "Omar", "Ruth", "Carl", "Jane", "Fred", "Olga",
    "Tim", "Sara",
)  # fmt: skip
JOBS = ("doctor", "teacher", "baker", "farmer", "pilot", "nurse", "driver", "cook", "singer", "painter")
PETS = ("cat", "dog", "fish", "bird", "rabbit", "horse")
CITIES = ("Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Delhi", "Madrid")
# Countable things for the word problems (regular plurals: "apple" -> "apples").
ITEMS = ("apple", "pear", "egg", "card", "coin", "stamp", "marble", "shell", "sticker", "cookie", "flower", "pencil")
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)  # fmt: skip
MAX_SUM = 19  # every sum, minuend and difference in the tasks is <= 19 ("under 20")

# Attribute name -> (entity kind, value set).
ATTRIBUTES = {
    "colour": ("object", COLOURS),
    "size": ("object", SIZES),
    "room": ("object", ROOMS),
    "job": ("person", JOBS),
    "pet": ("person", PETS),
    "city": ("person", CITIES),
}


@dataclass(frozen=True)
class World:
    """facts[(entity, attribute)] = value, e.g. facts[("ball", "colour")] = "red"."""

    facts: dict[tuple[str, str], str]

    def entities(self, kind: str) -> tuple[str, ...]:
        return OBJECTS if kind == "object" else PEOPLE


def build_world(seed: int = SEED) -> World:
    rng = random.Random(seed)
    facts: dict[tuple[str, str], str] = {}
    for attribute, (kind, values) in ATTRIBUTES.items():
        for entity in OBJECTS if kind == "object" else PEOPLE:
            facts[(entity, attribute)] = rng.choice(values)
    return World(facts)


# ---------------------------------------------------------------------------------------------------------------
# Pretraining corpus: plain declarative sentences, one per line.
_EITHER_OR = {
    "colour": "Is the {e} {a} or {b}?",
    "size": "Is the {e} {a} or {b}?",
    "room": "Is the {e} in the {a} or in the {b}?",
    "job": "Is {e} a {a} or a {b}?",
    "pet": "Does {e} have a {a} or a {b}?",
    "city": "Does {e} live in {a} or in {b}?",
}


# Yes/no questions about a fact, three phrasings each; {v} is the value asked about.
_YES_NO = {
    "colour": ("Is the {e} {v}?", "Is the colour of the {e} {v}?", "Is it true that the {e} is {v}?"),
    "size": ("Is the {e} {v}?", "Is the size of the {e} {v}?", "Is it true that the {e} is {v}?"),
    "room": ("Is the {e} in the {v}?", "Can you find the {e} in the {v}?", "Is it true that the {e} is in the {v}?"),
    "job": ("Is {e} a {v}?", "Does {e} work as a {v}?", "Is it true that {e} is a {v}?"),
    "pet": ("Does {e} have a {v}?", "Is the pet of {e} a {v}?", "Is it true that {e} has a {v}?"),
    "city": ("Does {e} live in {v}?", "Is {e} from {v}?", "Is it true that {e} lives in {v}?"),
}


def yes_no_sentences(world: World, entity: str, attribute: str, rng: random.Random) -> list[str]:
    """Every yes/no question about one fact (each value, a random phrasing) with its plain answer:
    "Is the ball red? No. The ball is brown." / "Is the ball brown? Yes. The ball is brown." """
    value = world.facts[(entity, attribute)]
    statement = _phrasings(world, entity, attribute, rng)[0]  # "The ball is brown." etc.
    lines = []
    for v in ATTRIBUTES[attribute][1]:
        question = rng.choice(_YES_NO[attribute]).format(e=entity, v=v)
        lines.append(f"{question} {'Yes' if v == value else 'No'}. {statement}")
    return lines


def which_one_sentences(world: World, entity: str, attribute: str, rng: random.Random) -> list[str]:
    """Every plain either/or question about one fact (each wrong value, both orders), answered by position:
    "Is the ball red or blue? The second one, blue.", "... 1: red. 2: blue. It is 2, blue." or
    "... 1: red. 2: blue. Say 1 or 2. It is 2, blue." Pretraining thus knows which of two is right (as web text
    teaches real LMs); the Option1/option1 format and "the correct answer is" are left to fine-tuning."""
    value = world.facts[(entity, attribute)]
    lines = []
    for other in ATTRIBUTES[attribute][1]:
        if other == value:
            continue
        for first in (True, False):
            a, b = (value, other) if first else (other, value)
            question = _EITHER_OR[attribute].format(e=entity, a=a, b=b)
            form = rng.randrange(3)
            if form == 0:
                lines.append(f"{question} The {'first' if first else 'second'} one, {value}.")
            else:
                say = " Say 1 or 2." if form == 2 else ""
                lines.append(f"{question} 1: {a}. 2: {b}.{say} It is {1 if first else 2}, {value}.")
    return lines


def fact_sentences(world: World, entity: str, attribute: str, rng: random.Random) -> list[str]:
    """Several plain-English phrasings of one fact, including a plain either/or question with its answer."""
    return _phrasings(world, entity, attribute, rng)


def _phrasings(world: World, entity: str, attribute: str, rng: random.Random) -> list[str]:
    value = world.facts[(entity, attribute)]
    other = rng.choice([v for v in ATTRIBUTES[attribute][1] if v != value])
    a, b = (value, other) if rng.random() < 0.5 else (other, value)
    if attribute == "colour":
        return [
            f"The {entity} is {value}.",
            f"The colour of the {entity} is {value}.",
            f"{rng.choice(('What', 'Which'))} colour is the {entity}? The {entity} is {value}.",
            f"Is the {entity} {a} or {b}? The {entity} is {value}, not {other}.",
        ]
    if attribute == "size":
        return [
            f"The {entity} is {value}.",
            f"The size of the {entity} is {value}.",
            f"What size is the {entity}? The {entity} is {value}.",
            f"Is the {entity} big or small? The {entity} is {value}.",
            f"The {entity} is not {other}. It is {value}.",
        ]
    if attribute == "room":
        return [
            f"The {entity} is in the {value}.",
            f"You can find the {entity} in the {value}.",
            f"Where is the {entity}? The {entity} is in the {value}.",
            f"Is the {entity} in the {a} or in the {b}? The {entity} is in the {value}, not in the {other}.",
        ]
    if attribute == "job":
        return [
            f"{entity} is a {value}.",
            f"{entity} works as a {value}.",
            f"What is {entity}'s job? {entity} is a {value}.",
            f"Is {entity} a {a} or a {b}? {entity} is a {value}, not a {other}.",
        ]
    if attribute == "pet":
        return [
            f"{entity} has a {value}.",
            f"The pet of {entity} is a {value}.",
            f"Which pet does {entity} have? {entity} has a {value}.",
            f"Does {entity} have a {a} or a {b}? {entity} has a {value}, not a {other}.",
        ]
    return [  # city
        f"{entity} lives in {value}.",
        f"{entity} is from {value}.",
        f"Where does {entity} live? {entity} lives in {value}.",
        f"Does {entity} live in {a} or in {b}? {entity} lives in {value}, not in {other}.",
    ]


def combined_sentences(world: World, rng: random.Random) -> list[str]:
    """Sentences that mention two facts of one entity at once."""
    lines = []
    for o in OBJECTS:
        colour, size, room = (world.facts[(o, a)] for a in ("colour", "size", "room"))
        lines += [f"The {size} {colour} {o} is in the {room}.", f"In the {room} there is a {colour} {o}."]
    for p in PEOPLE:
        job, pet, city = (world.facts[(p, a)] for a in ("job", "pet", "city"))
        lines += [f"{p} is a {job} in {city}.", f"{p}, the {job}, has a {pet}."]
    rng.shuffle(lines)
    return lines


def arithmetic_sentences(rng: random.Random) -> list[str]:
    """Every sum and difference with numbers 0..20 (result <= 20), in digits and in words."""
    lines = []
    for a in range(21):
        for b in range(21 - a):
            c = a + b
            wa, wb, wc = NUMBER_WORDS[a], NUMBER_WORDS[b], NUMBER_WORDS[c]
            lines += [
                f"{a} + {b} = {c}.",
                f"{wa} plus {wb} is {wc}.",
                f"{c} - {b} = {a}.",
                f"{wc} minus {wb} is {wa}.",
            ]
            # Operands named first, then the equation: reading numbers from context into an equation.
            lines += [f"Add {a} and {b}: {a} + {b} = {c}.", f"Take {b} from {c}: {c} - {b} = {a}."]
    for n in range(21):
        lines.append(f"{n} is {NUMBER_WORDS[n]}.")
    return lines


def usage_sentences(rng: random.Random, n: int) -> list[str]:
    """Sentences with the word problems' vocabulary and small quantities. They state or repeat quantities (so the
    model learns to read and copy numbers in context) but never compute one from a story."""
    templates = (
        "{n} has {k} {items}.",
        "{n} buys {k} {items}.",
        "{n} gives {k} {items} to {m}.",
        "{n} had {k} {items}.",
        "{n} lost {k} {items}.",
        "{n} found {k} {items}.",
        "{n} eats {k} {items}.",
        "{n} has some {items} left.",
        "Now {n} has more {items} than {m}.",
        "{n} puts {k} {items} in the box.",
        "{n} takes {k} {items} out of the box.",
        "{n} has {k} {items} and buys {j} more.",
        "{n} has {k} {items} and gives {j} to {m}.",
        "{n} has {k} {items}. {m} has {j} {items}.",
        "{n} has {k} {items}. How many {items} does {n} have? {n} has {k} {items}.",
        "{n} has {k} {items} now. How many {items} does {n} have now? {n} has {k} {items} now.",
        "There are {k} {items} in a box. How many {items} are in the box? There are {k} {items} in the box.",
        "{n} has {k} {items} and {m} has {j} {items}. {n} has {k} and {m} has {j}.",
    )
    lines = []
    for _ in range(n):
        person, other = rng.sample(PEOPLE, 2)
        k, j = rng.randint(2, MAX_SUM), rng.randint(2, MAX_SUM)
        items = rng.choice(ITEMS) + "s"
        lines.append(rng.choice(templates).format(n=person, m=other, k=k, j=j, items=items))
    return lines


def story_sentences(rng: random.Random, n: int) -> list[str]:
    """Arithmetic in plain language: a word-problem statement (no question) followed by its equation, e.g.
    "Emma has 9 stickers and buys 8 more. That is 9 + 8 = 17." Never the task's question or "The answer is"."""
    lines = []
    for _ in range(n):
        record = math_record(rng)
        statement = record["instruction"].split(" How many")[0]
        equation = record["output"].split(". The answer is")[0]
        lines.append(f"{statement} That is {equation}.")
    return lines


def pretrain_corpus(seed: int = SEED, repeats: int = 6) -> list[str]:
    """The pretraining corpus, one sentence per line. Each fact appears ``repeats`` times in fresh phrasings."""
    world = build_world(seed)
    rng = random.Random(seed + 1)
    lines: list[str] = []
    for _ in range(repeats):
        for entity, attribute in world.facts:
            lines += fact_sentences(world, entity, attribute, rng)
        lines += combined_sentences(world, rng)
    for entity, attribute in world.facts:
        lines += which_one_sentences(world, entity, attribute, rng)
        for _ in range(2):
            lines += yes_no_sentences(world, entity, attribute, rng)
    for _ in range(2):
        lines += arithmetic_sentences(rng)
    lines += usage_sentences(rng, 1500)
    lines += story_sentences(rng, 1200)
    rng.shuffle(lines)
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Generic instruction examples (NOT the downstream tasks) so the frozen model knows the prompt's shell.
OPPOSITES = (
    ("hot", "cold"), ("up", "down"), ("fast", "slow"), ("old", "new"), ("wet", "dry"), ("light", "dark"),
    ("happy", "sad"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("high", "low"), ("soft", "hard"),
    ("correct", "wrong"), ("big", "small"),
)  # fmt: skip
# Words the downstream prompts use ("option", "answer", "correct", "format") occur in pretraining only as words
# to repeat or capitalise, so their tokens are trained but the task is never shown.
WORDS = OBJECTS + PETS + JOBS + ITEMS + COLOURS + ROOMS + ("option", "answer", "correct", "format", "word", "number")


# How a shell question asks for its answer form (so a format line after the question is familiar, not noise).
_SAY = {
    "first": ("Say first or second.", "Answer format: first/second"),
    "yes": ("Say yes or no.", "Answer format: yes/no"),
}


def instruction_examples(seed: int = SEED, n: int = 3000) -> list[tuple[str, str]]:
    """(instruction, response) pairs of simple kinds that are not the downstream tasks: repeat, opposite, plural,
    capitalise, numbers, bare sums ("Add 9 and 8." -> "9 + 8 = 17."), and the corpus's either/or and yes/no
    questions answered as in the corpus ("Is the ball red? Say yes or no." -> "No. The ball is brown.").
    They teach that an instruction is answered from what the model knows; the word problems, the Option1/Option2
    listing and the "the correct answer is optionN" / "The answer is N." answers appear only in fine-tuning."""
    world = build_world(seed)
    facts = sorted(world.facts)
    rng = random.Random(seed + 2)
    pairs = []
    for _ in range(n):
        kind = rng.randrange(11)
        if kind == 0:
            w = rng.choice(WORDS)
            pairs.append((f"Repeat the word {w}.", w))
        elif kind == 1:
            w1, w2 = rng.sample(WORDS, 2)
            pairs.append((f"Repeat the words {w1} and {w2}.", f"{w1} {w2}"))
        elif kind == 2:
            x, y = rng.choice(OPPOSITES)
            x, y = (x, y) if rng.random() < 0.5 else (y, x)
            pairs.append((f"What is the opposite of {x}?", f"The opposite of {x} is {y}."))
        elif kind == 3:
            w = rng.choice(OBJECTS + ITEMS)
            pairs.append((f"Write the plural of {w}.", f"{w}s"))
        elif kind == 4:
            w = rng.choice(WORDS)
            pairs.append((f"Write the word {w} with a capital letter.", w.capitalize()))
        elif kind == 5:
            k = rng.randrange(21)
            pairs.append((f"Write the number {k} in words.", NUMBER_WORDS[k]))
        elif kind == 6:
            x, y = rng.randrange(21), rng.randrange(21)
            pairs.append((f"Repeat the numbers {x} and {y}.", f"{x} {y}"))
        elif kind == 7:
            a = rng.randint(0, 20)
            b = rng.randint(0, 20 - a)
            pairs.append((f"Add {a} and {b}.", f"{a} + {b} = {a + b}."))
        elif kind == 8:
            a = rng.randint(0, 20)
            b = rng.randint(0, a)
            pairs.append((f"Take {b} from {a}.", f"{a} - {b} = {a - b}."))
        elif kind == 9:
            entity, attribute = rng.choice(facts)
            value = world.facts[(entity, attribute)]
            other = rng.choice([v for v in ATTRIBUTES[attribute][1] if v != value])
            first = rng.random() < 0.5
            a, b = (value, other) if first else (other, value)
            question = _EITHER_OR[attribute].format(e=entity, a=a, b=b)
            response = f"The {'first' if first else 'second'} one, {value}."
            pairs.append((f"{question} {rng.choice(_SAY['first'])}", response))
        else:
            entity, attribute = rng.choice(facts)
            value = world.facts[(entity, attribute)]
            v = value if rng.random() < 0.5 else rng.choice([v for v in ATTRIBUTES[attribute][1] if v != value])
            question = rng.choice(_YES_NO[attribute]).format(e=entity, v=v)
            statement = _phrasings(world, entity, attribute, rng)[0]
            pairs.append((f"{question} {rng.choice(_SAY['yes'])}", f"{'Yes' if v == value else 'No'}. {statement}"))
    return pairs


# ---------------------------------------------------------------------------------------------------------------
# Prompt templates: the exact LLM-Adapters bytes (see docs/method.md, "Prompt templates").
_I = " " * 16


def train_prompt(instruction: str, output: str) -> str:
    return (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"  \n\n{_I}### Instruction:\n{_I}{instruction}\n{_I}\n{_I}### Response:\n{_I}{output}"
    )


def eval_prompt(instruction: str, commonsense: bool) -> str:
    prompt = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f" \n\n{_I}### Instruction:\n{_I}{instruction}\n\n{_I}### Response:\n{_I}"
    )
    return prompt + ("the correct answer is" if commonsense else "")


# ---------------------------------------------------------------------------------------------------------------
# Downstream tasks.
def choice_record(world: World, entity: str, attribute: str, asked: str, phrasing: int) -> dict[str, str]:
    """One two-option question about a fact: "Is the ball red? Option1: yes Option2: no Answer format: ...".
    The question is one the corpus answers in plain words ("Is the ball red? No. The ball is brown."); what the
    model has not seen is the Option1/Option2 listing and the "the correct answer is optionN" answer."""
    question = _YES_NO[attribute][phrasing].format(e=entity, v=asked)
    gold = "option1" if asked == world.facts[(entity, attribute)] else "option2"
    return {
        "instruction": f"{question} Option1: yes Option2: no Answer format: option1/option2",
        "input": "",
        "output": f"the correct answer is {gold}",
        "answer": gold,
    }


def choice_records(world: World, pairs: list[tuple[str, str]], n: int, rng: random.Random) -> list[dict[str, str]]:
    """``n`` distinct questions about ``pairs``, exactly half with gold option1 (yes), drawn from all possible."""
    pool: dict[str, list[dict[str, str]]] = {"option1": [], "option2": []}
    for entity, attribute in pairs:
        for asked in ATTRIBUTES[attribute][1]:
            for phrasing in range(len(_YES_NO[attribute])):
                record = choice_record(world, entity, attribute, asked, phrasing)
                pool[record["answer"]].append(record)
    records = rng.sample(pool["option1"], n // 2) + rng.sample(pool["option2"], n - n // 2)
    rng.shuffle(records)
    return records


# {ia}/{ib}: the item noun agreeing with a/b ("1 apple", "3 apples"); {items}: always plural.
_MATH_ADD = (
    "{n} has {a} {ia} and buys {b} more. How many {items} does {n} have now?",
    "{n} has {a} {ia}. {m} gives {n} {b} more. How many {items} does {n} have now?",
    "There are {a} {ia} in a box. {n} puts {b} more {ib} in the box. How many {items} are in the box now?",
    "{n} found {a} {ia} and then {b} more. How many {items} did {n} find?",
)
_MATH_SUB = (
    "{n} has {a} {ia} and gives {b} to {m}. How many {items} does {n} have left?",
    "{n} had {a} {ia} and lost {b}. How many {items} does {n} have now?",
    "There are {a} {ia} in a box. {n} takes {b} {ib} out. How many {items} are in the box now?",
    "{n} has {a} {ia}. {m} has {b} {ib}. How many more {items} does {n} have than {m}?",
)


def math_record(rng: random.Random) -> dict[str, str]:
    n, m = rng.sample(PEOPLE, 2)
    item = rng.choice(ITEMS)
    if rng.random() < 0.5:
        a = rng.randint(1, MAX_SUM - 1)
        b = rng.randint(1, MAX_SUM - a)
        template, c, op = rng.choice(_MATH_ADD), a + b, "+"
    else:
        a = rng.randint(2, MAX_SUM)
        b = rng.randint(1, a - 1)
        template, c, op = rng.choice(_MATH_SUB), a - b, "-"
    return {
        "instruction": template.format(
            n=n, m=m, a=a, b=b, items=item + "s", ia=item + "s" * (a != 1), ib=item + "s" * (b != 1)
        ),
        "input": "",
        "output": f"{a} {op} {b} = {c}. The answer is {c}.",
        "answer": str(c),
    }


def math_records(n: int, rng: random.Random, taken: set[str]) -> list[dict[str, str]]:
    """``n`` word problems whose instructions are not in ``taken`` (which is updated)."""
    records = []
    while len(records) < n:
        record = math_record(rng)
        if record["instruction"] not in taken:
            taken.add(record["instruction"])
            records.append(record)
    return records


def build_splits(
    seed: int = SEED,
    n_train_choice: int = 800,
    n_train_math: int = 800,
    n_test: int = 100,
    test_pair_frac: float = 0.25,
) -> dict[str, list[dict[str, str]]]:
    """Returns {"train": both tasks mixed and shuffled, "demo_choice": test, "demo_math": test}.

    Choice: the (entity, attribute) pairs are split; test questions ask only about held-out pairs, so a test
    answer can only come from what the model learned in pretraining. Math: no test instruction occurs in train.
    """
    world = build_world(seed)
    rng = random.Random(seed + 3)
    pairs = sorted(world.facts)
    rng.shuffle(pairs)
    n_test_pairs = round(len(pairs) * test_pair_frac)
    test_pairs, train_pairs = pairs[:n_test_pairs], pairs[n_test_pairs:]
    choice_test = choice_records(world, test_pairs, n_test, rng)
    choice_train = choice_records(world, train_pairs, n_train_choice, rng)
    taken: set[str] = set()
    math_test = math_records(n_test, rng, taken)
    math_train = math_records(n_train_math, rng, taken)
    train = choice_train + math_train
    rng.shuffle(train)
    return {"train": train, "demo_choice": choice_test, "demo_math": math_test}


# ---------------------------------------------------------------------------------------------------------------
# Files.
CORPUS_SHIP_LIMIT = 1_000_000  # bytes; a larger corpus is regenerated by the pretraining script instead


def dumps_records(records: list[dict[str, str]]) -> str:
    return json.dumps(records, indent=4, ensure_ascii=False) + "\n"


def render_files(seed: int = SEED) -> dict[str, str]:
    """Relative path -> exact file text, for everything shipped under ``demo/data``."""
    splits = build_splits(seed)
    files = {
        "train.json": dumps_records(splits["train"]),
        "demo_choice/test.json": dumps_records(splits["demo_choice"]),
        "demo_math/test.json": dumps_records(splits["demo_math"]),
    }
    corpus = "\n".join(pretrain_corpus(seed)) + "\n"
    if len(corpus.encode()) < CORPUS_SHIP_LIMIT:
        files["pretrain.txt"] = corpus
    return files


def write_files(out_dir: Path, seed: int = SEED) -> list[Path]:
    written = []
    for rel, text in render_files(seed).items():
        path = Path(out_dir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
        written.append(path)
    return written
