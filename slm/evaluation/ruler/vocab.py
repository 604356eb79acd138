"""Word material for the generators: English words for keys and word lists, and an endless,
seeded pool that continues with pronounceable pseudo-words once the real words run out.

RULER draws its keys ("adjective-noun") and its common-words lists from the `wonderwords`
package; these built-in lists play that role without a dependency or a download.
"""

from __future__ import annotations

import random
import string

# the word lists stay packed, several words a line, not one word per line
# fmt: off
ADJECTIVES = [
    "able", "acid", "angry", "ashamed", "awful", "basic", "bitter", "black", "blue", "bold",
    "brave", "brief", "bright", "broad", "broken", "brown", "busy", "calm", "careful", "cheap",
    "chief", "clean", "clear", "clever", "close", "cold", "common", "cool", "crazy", "cruel",
    "curious", "damp", "dark", "dead", "dear", "deep", "dense", "dirty", "dry", "dull", "eager",
    "early", "easy", "empty", "equal", "exact", "faint", "fair", "false", "fancy", "fast", "fat",
    "fierce", "fine", "firm", "flat", "fond", "foolish", "fresh", "friendly", "full", "funny",
    "gentle", "giant", "glad", "golden", "good", "grand", "gray", "great", "green", "grumpy",
    "happy", "hard", "harsh", "heavy", "hidden", "high", "hollow", "honest", "huge", "humble",
    "hungry", "icy", "idle", "jolly", "keen", "kind", "large", "late", "lazy", "lean", "light",
    "little", "lively", "lone", "long", "loose", "loud", "lovely", "low", "loyal", "lucky", "mad",
    "mild", "modern", "narrow", "neat", "new", "nice", "noble", "noisy", "odd", "old", "open",
    "orange", "pale", "plain", "polite", "poor", "proud", "pure", "purple", "quick", "quiet",
    "rapid", "rare", "raw", "ready", "red", "rich", "rigid", "ripe", "rough", "round", "royal",
    "rude", "rusty", "sad", "safe", "salty", "sharp", "shiny", "short", "shy", "silent", "silly",
    "simple", "slim", "slow", "small", "smart", "smooth", "soft", "solid", "sour", "spare", "stale",
    "steep", "stiff", "strange", "strict", "strong", "sudden", "sweet", "swift", "tall", "tame",
    "tense", "thick", "thin", "tidy", "tiny", "tired", "tough", "true", "ugly", "vast", "violet",
    "warm", "weak", "weary", "wet", "white", "whole", "wide", "wild", "wise", "witty", "young",
]

NOUNS = [
    "actor", "anchor", "apple", "arch", "arrow", "attic", "badge", "bakery", "ball", "balloon",
    "banana", "band", "barn", "basket", "beach", "bean", "bear", "bell", "bench", "berry",
    "bicycle", "bird", "blanket", "boat", "bone", "book", "boot", "bottle", "box", "bread", "brick",
    "bridge", "brush", "bucket", "button", "cabin", "cable", "cake", "camera", "candle", "canoe",
    "canvas", "car", "carpet", "castle", "cat", "cave", "chair", "chalk", "cherry", "chimney",
    "circle", "clock", "cloud", "coat", "coin", "comet", "copper", "corner", "cotton", "cradle",
    "crayon", "crown", "cup", "curtain", "desk", "diamond", "dog", "door", "dragon", "drum",
    "eagle", "engine", "feather", "fence", "field", "flag", "flower", "flute", "forest", "fork",
    "fountain", "fox", "frog", "garden", "gate", "giraffe", "glass", "glove", "goat", "guitar",
    "hammer", "harbor", "hat", "helmet", "hill", "honey", "horse", "house", "island", "jacket",
    "jar", "jewel", "kettle", "key", "kite", "ladder", "lake", "lamp", "lantern", "leaf", "lemon",
    "letter", "library", "lily", "lion", "map", "marble", "meadow", "mirror", "monkey", "moon",
    "mountain", "mouse", "needle", "nest", "ocean", "orchard", "owl", "paddle", "palace", "panda",
    "paper", "parrot", "pearl", "pebble", "pencil", "penguin", "piano", "pillow", "pipe", "planet",
    "plate", "pocket", "pond", "pot", "puzzle", "quilt", "rabbit", "radio", "rain", "ribbon",
    "river", "robot", "rocket", "rope", "rose", "saddle", "sail", "sand", "saucer", "scarf",
    "shell", "ship", "shoe", "shovel", "silver", "sled", "snail", "snow", "sock", "spoon", "star",
    "stone", "stove", "street", "sugar", "table", "teapot", "tent", "thread", "tiger", "tower",
    "train", "tree", "trumpet", "tulip", "tunnel", "turtle", "umbrella", "valley", "vase", "violin",
    "wagon", "wall", "wallet", "whale", "wheel", "whistle", "window", "wing", "wolf", "wool",
    "yacht", "zebra",
]

VERBS = [
    "accept", "add", "admire", "allow", "answer", "arrive", "ask", "bake", "balance", "bathe",
    "beg", "belong", "blink", "boil", "borrow", "bounce", "breathe", "bring", "brush", "build",
    "bump", "calculate", "call", "camp", "carry", "catch", "chase", "cheer", "chew", "clap",
    "climb", "collect", "compare", "cook", "copy", "count", "cover", "crawl", "cross", "cry",
    "dance", "deliver", "dig", "divide", "dream", "drink", "drive", "drop", "dust", "earn", "enjoy",
    "enter", "explain", "fetch", "fill", "find", "fix", "float", "fold", "follow", "gather", "glow",
    "grab", "greet", "grow", "guard", "guess", "hang", "help", "hide", "hike", "hop", "hug", "hunt",
    "hurry", "invent", "jog", "join", "juggle", "jump", "kick", "kneel", "knit", "knock", "laugh",
    "lead", "learn", "lift", "listen", "march", "measure", "melt", "mend", "mix", "move", "nod",
    "notice", "obey", "offer", "open", "order", "paint", "pack", "pass", "plant", "play", "polish",
    "pour", "pray", "print", "pull", "push", "race", "reach", "read", "relax", "remember", "repair",
    "rescue", "ride", "ring", "roll", "rub", "run", "rush", "sail", "scatter", "search", "sew",
    "shake", "share", "shine", "shout", "sing", "sip", "skate", "sketch", "ski", "sleep", "slide",
    "smile", "sneeze", "solve", "sort", "spell", "spill", "spin", "splash", "squeeze", "stack",
    "stamp", "stir", "stretch", "study", "swim", "swing", "talk", "taste", "teach", "tickle", "tie",
    "toss", "trace", "travel", "trust", "turn", "twist", "type", "unlock", "vanish", "visit",
    "wait", "walk", "wander", "wash", "watch", "wave", "weave", "whisper", "win", "wink", "wish",
    "wobble", "wonder", "work", "wrap", "write", "yawn", "zip",
]
# fmt: on

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))


class WordPool:
    """An endless list of distinct words in a seeded order: the real words shuffled, then
    pseudo-words (consonant-vowel syllables). `first(n)` is prefix-stable: the first n words do
    not depend on how many are asked for later."""

    def __init__(self, seed: int, words: list[str] | None = None):
        self._rng = random.Random(seed)
        base = sorted(set(words if words is not None else NOUNS + ADJECTIVES + VERBS))
        self._rng.shuffle(base)
        self._words = base
        self._seen = set(base)

    def first(self, n: int) -> list[str]:
        while len(self._words) < n:
            w = _pseudo_word(self._rng)
            if w not in self._seen:
                self._seen.add(w)
                self._words.append(w)
        return self._words[:n]


class CodedWords:
    """Distinct random lowercase strings (RULER's "coded words"), prefix-stable like WordPool."""

    def __init__(self, seed: int, length: int):
        self._rng = random.Random(seed)
        self._length = length
        self._words: list[str] = []
        self._seen: set[str] = set()

    def first(self, n: int) -> list[str]:
        while len(self._words) < n:
            w = "".join(self._rng.choice(string.ascii_lowercase) for _ in range(self._length))
            if w not in self._seen:
                self._seen.add(w)
                self._words.append(w)
        return self._words[:n]
