"""A built-in corpus of simple stories that reward tracking entities.

Each story introduces a hero, a friend, a coloured object, a place and
sometimes a pet, and later refers back to them ("Lily had a red ball. ... They
found the red ball behind a tree. Lily gave the ball to Tom."). Which name,
colour, object or place comes next is fixed by the story so far but not by the
previous word, so a model that remembers entities beats a bigram model. The
corpus needs no files and no network, and story ``i`` of a split is a pure
function of ``(seed, split, i)``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from qsf_jax import _checks

# Part of the synthetic source's cache key: bump it whenever the stories change
# (tests/test_data_sources.py holds a fingerprint of each version's stories).
SYNTHETIC_VERSION = 1

_GIRLS = ("Lily", "Mia", "Anna", "Lucy", "Emma", "Sue", "Kate", "Zoe", "Ella", "Amy",
          "Rose", "Jane", "Sara", "Ivy", "Ruby", "Nora")
_BOYS = ("Tom", "Ben", "Sam", "Max", "Jack", "Tim", "Leo", "Jake", "Finn", "Joe", "Dan",
         "Bob", "Ned", "Luke", "Ollie", "Ray")
_OBJECTS = ("ball", "kite", "book", "doll", "hat", "box", "car", "boat", "cup", "drum",
            "bell", "train", "teddy bear", "blanket", "shovel", "bucket", "robot",
            "balloon", "crayon", "flower")
_COLORS = ("red", "blue", "green", "yellow", "pink", "purple", "orange", "white", "black",
           "brown")
_PLACES = ("park", "garden", "beach", "forest", "kitchen", "yard", "school", "farm", "lake",
           "hill", "library", "zoo")
_ANIMALS = (("dog", "barked"), ("cat", "meowed"), ("bird", "sang"), ("duck", "quacked"),
            ("frog", "croaked"), ("bunny", "hopped"))
_PET_NAMES = ("Spot", "Fluffy", "Buddy", "Coco", "Pip", "Rex", "Daisy", "Bean")
_HIDING = ("under a bush", "behind a tree", "under the bed", "in a big box",
           "near the gate", "under a rock", "behind the door", "in the tall grass")
_FEELINGS = ("happy", "sad", "excited", "tired", "surprised", "scared", "proud")
_ADJ = ("little", "kind", "happy", "brave", "curious", "shy")


def _person(rng: random.Random, exclude: str = "") -> dict:
  girl = rng.random() < 0.5
  name = rng.choice([n for n in (_GIRLS if girl else _BOYS) if n != exclude])
  return dict(name=name, kid="girl" if girl else "boy", she="She" if girl else "He",
              her="her" if girl else "his")


SPLITS = ("train", "validation")


def synthetic_story(index: int, *, seed: int = 0, split: str = "train") -> str:
  """Returns story ``index`` of the synthetic corpus.

  Args:
    index: story number (>= 0).
    seed: corpus seed; different seeds give different corpora.
    split: ``"train"`` or ``"validation"``; the splits use independent streams.
  """
  _checks.check_int("index", index, 0)
  _checks.check_int("seed", seed)
  if split not in SPLITS:  # another name gave an unrelated third stream
    raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
  rng = random.Random(f"qsf-synthetic-v{SYNTHETIC_VERSION}:{split}:{seed}:{index}")
  h = _person(rng)
  f = _person(rng, exclude=h["name"])
  H, F, she, her = h["name"], f["name"], h["she"], h["her"]
  obj, color, place = rng.choice(_OBJECTS), rng.choice(_COLORS), rng.choice(_PLACES)
  obj2 = rng.choice([o for o in _OBJECTS if o != obj])
  color2 = rng.choice([c for c in _COLORS if c != color])
  animal, sound = rng.choice(_ANIMALS)
  pet = rng.choice(_PET_NAMES) if rng.random() < 0.4 else None
  kid = h["kid"]

  s = [rng.choice((
      f"Once upon a time, there was a {rng.choice(_ADJ)} {kid} named {H}.",
      f"One day, a {rng.choice(_ADJ)} {kid} named {H} woke up early.",
      f"There once was a {kid} called {H}.",
  ))]
  s.append(rng.choice((
      f"{H} had a {color} {obj}.",
      f"{H}'s favorite toy was a {color} {obj}.",
      f"{she} had a {color} {obj} and loved it very much.",
  )))
  if pet:
    s.append(f"{H} also had a {animal} named {pet}.")
  s.append(rng.choice((
      f"One day, {H} took the {obj} to the {place}.",
      f"{H} and {her} {obj} went to the {place}.",
      f"In the morning, {H} went to the {place} with the {obj}.",
  )))
  s.append(rng.choice((
      f"At the {place}, {H} met {her} friend {F}.",
      f"There, {H} saw a {f['kid']} named {F}.",
      f"{F} was at the {place} too.",
  )))
  middle = [
      "The sun was bright and the sky was blue.",
      f"{F} said, \"I like your {obj}, {H}!\"",
      f"They played with the {obj} for a long time.",
      f"A {animal} {sound} nearby.",
      f"{H} felt {rng.choice(_FEELINGS)}.",
      f"{F} had a {color2} {obj2}.",
  ]
  if pet:
    middle.append(f"{pet} ran around the {place}.")
  rng.shuffle(middle)
  s.extend(middle[:rng.randint(1, 4)])
  if rng.random() < 0.6:
    s.append(rng.choice((
        f"Then the wind came and the {obj} was gone!",
        f"Oh no! {H} could not find the {obj}.",
    )))
    s.append(rng.choice((
        f"{H} and {F} looked everywhere.",
        f"{F} helped {H} look for it.",
    )))
    s.append(f"They found the {color} {obj} {rng.choice(_HIDING)}.")
  s.append(rng.choice((
      f"{H} gave the {obj} to {F}.",
      f"{H} let {F} play with the {color} {obj}.",
      f"{H} shared the {obj} with {F}.",
  )))
  s.append(f"{F} said, \"Thank you, {H}!\"")
  s.append(rng.choice((
      f"When it was time to go, {H} said goodbye to {F} and went home from the {place}.",
      f"{H} and {F} were best friends after that day at the {place}.",
      f"After that, {H} always shared {her} {color} {obj}.",
  )))
  return " ".join(s)


def synthetic_stories(n: int, *, seed: int = 0, split: str = "train") -> Iterator[str]:
  """Yields stories ``0 .. n-1`` of a synthetic split (see ``synthetic_story``).

  Args:
    n: number of stories (>= 0).
    seed: corpus seed.
    split: ``"train"`` or ``"validation"``.
  """
  _checks.check_int("n", n, 0)
  if split not in SPLITS:
    raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
  for i in range(n):
    yield synthetic_story(i, seed=seed, split=split)
