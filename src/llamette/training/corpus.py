"""A corpus of simple children's stories, generated from a small grammar: text llamette may ship.

Every story is drawn from a seeded random generator: characters (a name, a kind, a pronoun),
places, things, a wish, a problem, a helper, what they say, how it ends. The same seed gives the
same text. Written for llamette; no outside text is used.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

GIRLS = ["Lily", "Mia", "Emma", "Sara", "Anna", "Lucy", "Zoe", "Ella", "Rose", "Kate", "Nina",
         "Amy", "Grace", "Ruby", "Ivy", "Lena", "Maya", "Jane", "Daisy", "Hannah"]  # fmt: skip
BOYS = ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Finn", "Noah", "Jake", "Owen", "Luke",
        "Adam", "Eli", "Dan", "Paul", "Theo", "Ryan", "Kai", "Oscar"]  # fmt: skip
PEOPLE = {"she": ["little girl", "girl", "kind girl", "happy girl", "small girl"],
          "he": ["little boy", "boy", "kind boy", "happy boy", "small boy"]}  # fmt: skip
ANIMALS = ["dog", "cat", "bunny", "bird", "duck", "frog", "bear", "fox", "mouse", "pig", "lamb",
           "owl", "turtle", "puppy", "kitten", "squirrel"]  # fmt: skip
ANIMAL_ADJECTIVES = ["little", "friendly", "fluffy", "tiny", "brave", "silly", "gentle", "funny"]
PLACES = ["the park", "the forest", "the garden", "the beach", "the farm", "the big hill",
          "the river", "the meadow", "the playground", "the woods", "the lake", "the yard"]  # fmt: skip
THINGS = ["ball", "kite", "box", "hat", "boat", "book", "flower", "shell", "key", "balloon", "toy car",
          "teddy bear", "cup", "drum", "stone", "leaf", "apple", "scarf", "bell", "blanket"]  # fmt: skip
COLORS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "shiny", "big", "small",
          "soft", "old", "new", "pretty"]  # fmt: skip
GAMES = ["play tag", "build a sand castle", "look for bugs", "fly a kite", "jump in the leaves",
         "play hide and seek", "pick flowers", "sing songs", "have a picnic", "race to the tree",
         "draw pictures", "splash in the water"]  # fmt: skip
FEELINGS_BAD = ["sad", "worried", "scared", "upset", "lonely"]
FEELINGS_GOOD = ["happy", "glad", "proud", "excited", "thankful"]
WEATHER = ["sunny", "warm", "windy", "bright", "cold", "rainy", "quiet", "lovely"]
FOODS = ["cookies", "apples", "cupcakes", "berries", "carrots", "muffins", "cherries", "grapes"]
LESSONS = [
    "it is good to help your friends",
    "sharing makes everyone happy",
    "you should always say thank you",
    "being kind is the best thing to do",
    "friends can fix any problem together",
    "it is okay to ask for help",
    "telling the truth is important",
    "a little patience goes a long way",
]


@dataclass(frozen=True)
class Character:
    name: str
    kind: str  # "little girl", "friendly dog"
    pronoun: str  # "she" / "he"

    @property
    def object(self) -> str:
        return "her" if self.pronoun == "she" else "him"

    @property
    def possessive(self) -> str:
        return "her" if self.pronoun == "she" else "his"

    @property
    def subject(self) -> str:
        return self.pronoun.capitalize()


def character(rng: random.Random, avoid: str = "") -> Character:
    pronoun = rng.choice(["she", "he"])
    names = [n for n in (GIRLS if pronoun == "she" else BOYS) if n != avoid]
    name = rng.choice(names)
    if rng.random() < 0.7:
        return Character(name, rng.choice(PEOPLE[pronoun]), pronoun)
    return Character(name, f"{rng.choice(ANIMAL_ADJECTIVES)} {rng.choice(ANIMALS)}", pronoun)


def a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def story(rng: random.Random) -> str:
    """One story: an opening, then two episodes (a problem, help, an ending) with the same hero."""
    hero = character(rng)
    friend = character(rng, avoid=hero.name)
    place, thing, color = rng.choice(PLACES), rng.choice(THINGS), rng.choice(COLORS)
    game, weather = rng.choice(GAMES), rng.choice(WEATHER)
    h, f = hero, friend
    opening = rng.choice([
        f"Once upon a time, there was {a(h.kind)} named {h.name}.",
        f"Once upon a time, in a small town, there lived {a(h.kind)} called {h.name}.",
        f"One {weather} day, {a(h.kind)} named {h.name} went to {place}.",
        f"There was once {a(h.kind)} named {h.name} who loved to {game}.",
    ])  # fmt: skip
    likes = rng.choice([
        f"{h.subject} had {a(color + ' ' + thing)} that {h.pronoun} loved very much.",
        f"{h.subject} loved to {game} with {h.possessive} friend {f.name}, {a(f.kind)}.",
        f"Every day, {h.pronoun} went to {place} to {game}.",
        f"{h.subject} liked to eat {rng.choice(FOODS)} and play with {h.possessive} {color} {thing}.",
    ])  # fmt: skip
    first, second = rng.sample(range(4), 2)
    paragraphs = [f"{opening} {likes}", *episode(rng, hero, friend, first, later=False)]
    paragraphs += episode(rng, hero, character(rng, avoid=hero.name), second, later=True)
    if rng.random() < 0.3:
        paragraphs.append("The end.")
    return "\n".join(paragraphs)


def episode(
    rng: random.Random, h: Character, f: Character, problem_kind: int, later: bool
) -> list[str]:
    """A problem, the help that comes, and how it ends: three paragraphs."""
    place, thing, color = rng.choice(PLACES), rng.choice(THINGS), rng.choice(COLORS)
    game, weather = rng.choice(GAMES), rng.choice(WEATHER)
    sad, happy = rng.choice(FEELINGS_BAD), rng.choice(FEELINGS_GOOD)
    when = "The next day" if later else rng.choice(["One day", f"One {weather} morning"])
    if problem_kind == 0:
        problem = (f"{when}, {h.name} went to {place} with {h.possessive} {color} {thing}. "
                   f"{h.subject} played for a long time. But when it was time to go home, the {thing} "
                   f"was gone! {h.name} looked everywhere, but {h.pronoun} could not find it. "
                   f"{h.subject} felt very {sad}.")  # fmt: skip
        help_text = (f'Then {f.name}, {a(f.kind)}, came by. "Why are you {sad}?" asked {f.name}. '
                     f'"I lost my {thing}," said {h.name}. "I will help you look," said {f.name}. '
                     f"They looked under the trees and behind the rocks. At last, {f.name} found the "
                     f"{thing} in the tall grass.")  # fmt: skip
        ending = (f'"Thank you, {f.name}!" said {h.name}. {h.subject} was so {happy}. '
                  f"From that day on, {h.name} and {f.name} were best friends, and they played "
                  f"together every day.")  # fmt: skip
    elif problem_kind == 1:
        problem = (f"{when}, {h.name} wanted to {game} at {place}. But {h.pronoun} "
                   f"had no one to play with. {h.subject} sat down and felt {sad}.")  # fmt: skip
        help_text = (f'Soon, {a(f.kind)} named {f.name} walked by. "Hello! Can I play with you?" '
                     f'asked {f.name}. "Yes, please!" said {h.name} with a big smile. '
                     f"They played together until the sun went down.")  # fmt: skip
        ending = (f"{h.name} was not {sad} anymore. {h.subject} felt {happy} to have a new friend. "
                  f'"Let\'s play again tomorrow," said {f.name}. And they did.')  # fmt: skip
    elif problem_kind == 2:
        problem = (f"{when}, {h.name} saw {f.name}, {a(f.kind)}, sitting alone near {place}. "
                   f"{f.name} looked {sad}. {f.possessive.capitalize()} {color} {thing} was stuck "
                   f"high up in a tree.")  # fmt: skip
        help_text = (f'"Don\'t worry, I will help you," said {h.name}. {h.subject} found a long stick '
                     f"and reached up as high as {h.pronoun} could. The {thing} fell down into "
                     f"{f.name}'s arms.")  # fmt: skip
        ending = (f'"Thank you, {h.name}! You are so kind," said {f.name}. {h.name} felt {happy}. '
                  f"{h.subject} learned that {rng.choice(LESSONS)}.")  # fmt: skip
    else:
        food = rng.choice(FOODS)
        problem = (f"{when}, {h.name}'s mom made some {food}. {h.name} wanted to eat them all by {h.object}self. "
                   f"Then {h.possessive} friend {f.name} came to visit. {f.name} was very hungry.")  # fmt: skip
        help_text = (f"{h.name} looked at the {food}. Then {h.pronoun} looked at {f.name}. "
                     f'"Do you want some?" asked {h.name}. "Yes, please," said {f.name}. '
                     f"So {h.name} shared the {food} with {f.name}.")  # fmt: skip
        ending = (f"The two friends sat together and ate. They were both very {happy}. "
                  f"{h.name} learned that {rng.choice(LESSONS)}.")  # fmt: skip
    return [problem, help_text, ending]


def make_corpus(n_stories: int, seed: int) -> list[str]:
    """n_stories stories from the grammar, reproducible from the seed."""
    rng = random.Random(seed)
    return [story(rng) for _ in range(n_stories)]
