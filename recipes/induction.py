"""Induction (the paper's Fig. 7): children's-story-like text whose characters have random two-token names.

Tokens are bytes (mtp-preprocess --tokenizer bytes). The story text is ASCII, so bytes 0x80-0xFF never occur
in it; a name is one Unicode character from U+0100..U+07FF, whose UTF-8 form is exactly two bytes: a lead byte
0xC4..0xDF (28 values) and a continuation byte 0x80..0xBF (64 values), both drawn uniformly. So every name is
two tokens that occur nowhere but in names (1792 names), and the second is unpredictable from the first except
by copying an earlier occurrence in the same story: the model must do induction. The characters of one story
have distinct lead bytes, so the first token of a name determines which earlier name to copy.

The generator: 2 or 3 characters, each a random name and a kind of animal, meet in a place and then go through
6 to 12 sentences drawn from templates over lists of places, objects, colours, foods, feelings and actions, each
sentence naming one or two of the characters; a closing sentence names one of them. The templates, the lists and
the random names give far more distinct stories than any run trains on (test stories are additionally held out
by their text), so memorising stories does not help.

Metric: at each occurrence of a name after its first in a story, whether the model's greedy next-token
prediction at the name's first byte is the name's second byte (teacher-forced, recipes/induction_eval.py);
reported overall and by occurrence (2, 3, 4+).
"""

from __future__ import annotations

import random

LEAD_BYTES = range(0xC4, 0xE0)
CONT_BYTES = range(0x80, 0xC0)

ANIMALS = ["a rabbit", "a fox", "a bear", "a mouse", "an owl", "a duck", "a cat", "a dog", "a frog", "a turtle",
           "a deer", "a squirrel", "a hedgehog", "a pig", "a goat", "a lamb", "a bird", "a lion", "a tiger",
           "a puppy", "a kitten", "a pony", "an otter", "a badger"]
PLACES = ["the park", "the forest", "the garden", "the beach", "the river", "the farm", "the meadow", "the hill",
          "the village", "the school", "the pond", "the market", "the old barn", "the playground", "the library",
          "the lake", "the cave", "the bakery", "the field", "the little house"]
OBJECTS = ["ball", "kite", "book", "hat", "box", "drum", "shell", "leaf", "stone", "cup", "blanket", "boat",
           "basket", "rope", "key", "map", "flower", "bell", "feather", "lantern", "spoon", "sock"]
COLOURS = ["red", "blue", "green", "yellow", "small", "big", "shiny", "soft", "old", "new", "round", "funny",
           "purple", "tiny", "golden", "striped"]
FOODS = ["apples", "cake", "bread", "berries", "soup", "cookies", "carrots", "honey", "pie", "cheese", "nuts",
         "pancakes", "grapes", "milk"]
FEELINGS = ["happy", "sad", "tired", "excited", "scared", "proud", "sleepy", "hungry", "curious", "brave",
            "surprised", "cold", "angry", "calm"]
ACTIONS = ["jumped", "ran", "sang", "danced", "laughed", "smiled", "waited", "looked around", "sat down",
           "played", "clapped", "walked slowly", "hid", "whistled", "shouted", "rested"]
TIMES = ["One day", "One morning", "Once upon a time", "Long ago", "On a sunny day", "On a rainy day",
         "One evening", "Last summer", "In the winter"]

ONE = [
    "{A} was {feeling}.", "{A} {action}.", "{A} found a {colour} {obj}.", "{A} wanted some {food}.",
    "{A} {action} near {place}.", "Then {A} said, \"I like this {obj}!\"", "{A} looked at the {colour} {obj}.",
    "\"Where is my {obj}?\" asked {A}.", "{A} felt {feeling} and {action}.", "{A} ate some {food}.",
    "After that, {A} went to {place}.", "{A} did not want to go home.", "{A} had a {colour} {obj} at home.",
    "Suddenly {A} {action}.", "{A} thought about the {obj} for a long time.", "Soon {A} was {feeling} again.",
]
TWO = [
    "{A} gave {B} a {colour} {obj}.", "{A} and {B} {action} together.", "{B} helped {A} find the {obj}.",
    "{A} told {B} a story about {place}.", "\"Let us go to {place}!\" said {A} to {B}.",
    "{B} shared the {food} with {A}.", "{A} and {B} were {feeling}.", "{B} laughed at {A} and the {obj}.",
    "{A} asked {B}, \"Do you want some {food}?\"", "{B} and {A} walked to {place}.",
    "{A} showed {B} the {colour} {obj}.", "{B} was {feeling}, so {A} {action}.",
    "{A} and {B} played with the {obj} at {place}.", "{B} hugged {A}.",
]
INTRO = "{time}, {animal} named {A} lived near {place}."
MEET = "{A} met {animal} named {B}."
END = ["In the end, {A} was very {feeling}.", "That night, {A} went to sleep.", "{A} never forgot that day.",
       "The end. {A} smiled."]


def name_of(lead: int, cont: int) -> str:
    return chr(((lead & 0x1F) << 6) | (cont & 0x3F))


def random_names(rng: random.Random, k: int) -> list[str]:
    """k names with distinct lead bytes (so a name's first token tells which earlier name it is)."""
    return [name_of(lead, rng.choice(CONT_BYTES)) for lead in rng.sample(LEAD_BYTES, k)]


# The CPU analogue ("dense" stories): the same names and lists, in short sentences that each name one or two
# characters, so that about one byte in five belongs to a name instead of one in ten. Induction heads
# form after a number of copy examples, not of tokens; dense stories give a small model enough of them in a CPU
# budget (Olsson et al. 2022 on how copying patterns drive their formation).
DENSE_ONE = ["{A} ran.", "{A} sat.", "{A} hid.", "{A} sang.", "{A} ate {food}.", "{A} was {feeling}.",
             "{A} got a {obj}.", "{A} went to {place}."]
DENSE_TWO = ["{A} saw {B}.", "{A} hugged {B}.", "{A} and {B} ran.", "{B} helped {A}.", "{A} gave {B} a {obj}.",
             "{A} told {B} a joke.", "{B} and {A} ate {food}.", "{A} met {B} at {place}."]
DENSE_INTRO = "{A} was {animal}."
STYLES = ("paper", "dense")


def story(rng: random.Random, style: str = "paper") -> str:
    if style == "dense":
        return dense_story(rng)
    names = random_names(rng, rng.choice((2, 3)))
    fill = lambda t, **kw: t.format(
        feeling=rng.choice(FEELINGS), action=rng.choice(ACTIONS), colour=rng.choice(COLOURS), obj=rng.choice(OBJECTS),
        food=rng.choice(FOODS), place=rng.choice(PLACES), animal=rng.choice(ANIMALS), time=rng.choice(TIMES), **kw)
    out = [fill(INTRO, A=names[0])]
    out += [fill(MEET, A=rng.choice(names[:i]), B=names[i]) for i in range(1, len(names))]
    for _ in range(rng.randint(6, 12)):
        if rng.random() < 0.5:
            out.append(fill(rng.choice(ONE), A=rng.choice(names)))
        else:
            a, b = rng.sample(names, 2)
            out.append(fill(rng.choice(TWO), A=a, B=b))
    out.append(fill(rng.choice(END), A=rng.choice(names)))
    return " ".join(out)


def dense_story(rng: random.Random) -> str:
    """3 or 4 characters introduced in one short sentence each, then 8 to 16 short sentences naming them (each
    character at least once more)."""
    names = random_names(rng, rng.choice((3, 4)))
    fill = lambda t, **kw: t.format(feeling=rng.choice(FEELINGS), obj=rng.choice(OBJECTS), food=rng.choice(FOODS),
                                    place=rng.choice(PLACES), animal=rng.choice(ANIMALS), **kw)
    out = [fill(DENSE_INTRO, A=a) for a in names]
    first = rng.sample(names, len(names))  # the first sentences name every character once more, so each recurs
    for i in range(rng.randint(8, 16)):
        a = first[i] if i < len(first) else rng.choice(names)
        if rng.random() < 0.4:
            out.append(fill(rng.choice(DENSE_ONE), A=a))
        else:
            out.append(fill(rng.choice(DENSE_TWO), A=a, B=rng.choice([b for b in names if b != a])))
    return " ".join(out)


def name_positions(tokens: list[int]) -> list[tuple[int, int]]:
    """(position of a name's first byte, occurrence number) for every occurrence after a name's first one.
    At such a position the next token is the name's second byte, which only an earlier occurrence tells."""
    seen: dict[bytes, int] = {}
    out = []
    for p, t in enumerate(tokens[:-1]):
        if t in LEAD_BYTES:
            name = (t, tokens[p + 1])
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                out.append((p, seen[name]))
    return out


def occurrence_group(k: int) -> str:
    return str(k) if k < 4 else "4+"


def make_datasets(seed: int, train_size: int, test_size: int, style: str = "paper") -> tuple[list[str], list[str]]:
    """(training stories, test stories) of one style; a test story's text never occurs in training."""
    if style not in STYLES:
        raise ValueError(f"story style must be one of {', '.join(STYLES)}, got {style!r}")
    rng = random.Random(f"induction-test-{seed}")
    tests = list(dict.fromkeys(story(rng, style) for _ in range(test_size)))
    held_out = set(tests)
    rng = random.Random(f"induction-train-{seed}")
    train = []
    while len(train) < train_size:
        s = story(rng, style)
        if s not in held_out:
            train.append(s)
    return train, tests
