"""Independent generators of training prompts for the R-ISD adapter (pure Python, no torch).

Owns: the prompt generators of the diverse training set and the word lists they draw on. Each is
its own source, and none shares a template with an evaluation split (`training.prompts` held-out
and novel grids, the hand-written `training.far_prompts`):
- `request_writer_prompts`: meta-prompts that make the *base model itself* write a user request
  about random seed words (nouns / verbs / adjectives of the `wonderwords` package's lists); the
  requests it writes become training prompts (`parse_request` cleans them);
- `paragraph_writer_prompts`: the base model writes short texts about seed words; their sentences
  and paragraphs feed the rewriting, translation and summarising tasks;
- task generators with random content: `arithmetic`, `word_problems`, `code_tasks` (several
  languages), `rewrite_tasks`, `translate_tasks`, `summarise_tasks`, `list_advice_fact_tasks`;
- `followups`: second user turns of multi-turn chats (the first turn is a generated pair).
Every generator takes a `random.Random`, so a data set is reproducible from its seed.
"""

from __future__ import annotations

import random
import re
from functools import cache
from importlib import resources


@cache
def word_list(kind: str) -> tuple[str, ...]:
    """`noun`, `verb` or `adjective` words of wonderwords' lists, without its profanity list."""
    assets = resources.files("wonderwords") / "assets"
    bad = set((assets / "profanitylist.txt").read_text().split())
    words = (assets / f"{kind}list.txt").read_text().split()
    return tuple(w for w in words if w.isalpha() and w.lower() not in bad and len(w) > 2)


def _pick(rng: random.Random, kind: str) -> str:
    return rng.choice(word_list(kind))


# -- material the base model writes ------------------------------------------------------------
_REQUEST_META = [
    "Write one question that a curious person might ask an AI assistant about {a}. Reply with the question only.",
    "Write a request that someone could send to a helpful assistant, involving {a} and {b}. Reply with the request only.",
    "Imagine a user who wants help with something related to {a}. Write their message to the assistant.",
    "Write a short instruction that asks an assistant to {v} something about {a}. Reply with the instruction only.",
    "Write a question a student might ask about {a}. Only write the question.",
    "Write a message asking for advice about {a}. Only write the message.",
]
_PARAGRAPH_META = [
    "Write a short paragraph about {a}.",
    "Write four sentences describing a {j} {a}.",
    "Write a short news story about {a} and {b}.",
    "Write a short paragraph explaining how to {v} a {a}.",
]


def request_writer_prompts(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(_REQUEST_META).format(a=_pick(rng, "noun"), b=_pick(rng, "noun"), v=_pick(rng, "verb"))
            for _ in range(n)]


def paragraph_writer_prompts(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(_PARAGRAPH_META).format(a=_pick(rng, "noun"), b=_pick(rng, "noun"), v=_pick(rng, "verb"),
                                               j=_pick(rng, "adjective")) for _ in range(n)]


_ASSISTANT_VOICE = re.compile(
    r"^(hello|hi|sure|of course|certainly|absolutely|as an ai|i'm here|i am here|i'm ready|i am ready|"
    r"i'd be happy|i would be happy|i'd love|i can help|to help|here is|here's|thank you)\b", re.I)


def parse_request(text: str) -> str | None:
    """A model-written request: the quoted request when the text quotes one, else its first line,
    trimmed of labels; None when it is too short or long, or reads as the assistant's own voice
    (a small base model often answers a meta-prompt instead of writing a request)."""
    quoted = re.findall(r'"([^"]{12,300})"', text)
    line = quoted[0] if quoted else next((x.strip() for x in text.strip().splitlines() if x.strip()), "")
    line = re.sub(r'^(question|request|message|instruction|user)\s*:\s*', "", line, flags=re.I).strip(' "\'*')
    words = line.split()
    if not 4 <= len(words) <= 45 or not re.search(r"[a-zA-Z]", line) or _ASSISTANT_VOICE.match(line):
        return None
    return line


def sentences(paragraphs: list[str]) -> list[str]:
    out = []
    for p in paragraphs:
        for s in re.split(r"(?<=[.!?])\s+", p.strip()):
            if 6 <= len(s.split()) <= 30 and s[-1] in ".!?":
                out.append(s)
    return out


# -- task generators with random content -------------------------------------------------------
_NAMES = ["Maya", "Tom", "Aisha", "Lucas", "Priya", "Jonas", "Elena", "Kofi", "Sara", "Ravi", "Mei", "Omar",
          "Hana", "Diego", "Nora", "Ivan", "Zoe", "Ahmed", "Lena", "Sam"]
_ITEMS = ["pencils", "stickers", "cookies", "marbles", "books", "coins", "stamps", "oranges", "cards", "beads"]


def arithmetic(rng: random.Random, n: int) -> list[str]:
    forms = [
        lambda a, b: f"Calculate {a} + {b}.", lambda a, b: f"What do you get when you multiply {a} by {b}?",
        lambda a, b: f"Compute {a * b} / {b}.", lambda a, b: f"Subtract {b} from {a + b}. Show your work.",
        lambda a, b: f"Is {a} bigger than {b}? By how much?", lambda a, b: f"What is {a} squared?",
        lambda a, b: f"Round {a}.{b} to the nearest whole number.", lambda a, b: f"Add up {a}, {b} and {a + b}.",
        lambda a, b: f"What is {b} percent of {a * 10}?", lambda a, b: f"Write {a} as a Roman numeral.",
    ]
    return [rng.choice(forms)(rng.randint(2, 999), rng.randint(2, 99)) for _ in range(n)]


def word_problems(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        a, b = rng.sample(_NAMES, 2)
        item, x, y, k = rng.choice(_ITEMS), rng.randint(3, 60), rng.randint(2, 30), rng.randint(2, 9)
        out.append(rng.choice([
            f"{a} has {x} {item} and gives {y} of them to {b}. How many {item} does {a} have left?",
            f"{a} buys {k} packs of {item} with {y} in each pack. How many {item} is that in total?",
            f"{a} and {b} share {x * k} {item} equally among {k} friends. How many does each friend get?",
            f"A shop sells {item} for {y} cents each. How much do {x} {item} cost in dollars?",
            f"{a} reads {y} pages a day. How many days does a {x * y}-page book take?",
            f"{a} walked {x} km on Monday and {y} km on Tuesday. How far did {a} walk in total?",
        ]))
    return out


_LANGS = ["Python", "JavaScript", "TypeScript", "C", "C++", "Java", "Go", "Rust", "Ruby", "Bash", "Kotlin", "PHP"]
_CODE_TASKS = [
    "sums the even numbers in a list", "reverses the words in a sentence", "counts the vowels in a string",
    "finds the largest number in an array", "converts Celsius to Fahrenheit", "tests whether a number is prime",
    "merges two sorted lists", "computes the factorial of n", "capitalises the first letter of each word",
    "gives the average of a list of numbers", "counts how often each word appears in a text",
    "flattens a nested list", "decides whether two strings are anagrams", "generates a random password",
    "computes the greatest common divisor of two numbers", "sorts a list of names alphabetically",
    "converts a number to binary", "finds the second smallest element of a list", "validates an email address",
    "rotates a list by k positions", "gives the common elements of two lists", "reads a text file line by line",
    "computes the area of a circle", "tells whether a year is a leap year", "strips whitespace from a string",
    "implements binary search", "counts the digits of an integer", "swaps two variables",
    "prints a multiplication table", "converts a string to title case", "finds the length of the longest word",
]


def code_tasks(rng: random.Random, n: int) -> list[str]:
    forms = [
        "Write a {l} function that {t}.", "Show me {l} code that {t}.", "How would I write something in {l} that {t}?",
        "Give an example {l} program that {t}, with comments.", "Implement a {l} function that {t} and explain it.",
    ]
    return [rng.choice(forms).format(l=rng.choice(_LANGS), t=rng.choice(_CODE_TASKS)) for _ in range(n)]


def rewrite_tasks(rng: random.Random, sents: list[str], n: int) -> list[str]:
    forms = ["Rewrite this in a formal tone: {s}", "Paraphrase the following sentence: {s}",
             "Make this sentence simpler for a child: {s}", "Rewrite this sentence in the past tense: {s}",
             "Turn this sentence into a question: {s}", "Make this sentence more exciting: {s}"]
    return [rng.choice(forms).format(s=rng.choice(sents)) for _ in range(n)] if sents else []


def translate_tasks(rng: random.Random, sents: list[str], n: int) -> list[str]:
    langs = ["French", "Spanish", "German", "Italian", "Portuguese", "Dutch"]
    forms = ["Translate into {g}: {s}", "Please give the {g} version of this sentence: {s}",
             "How would you say this in {g}? {s}"]
    return [rng.choice(forms).format(g=rng.choice(langs), s=rng.choice(sents)) for _ in range(n)] if sents else []


def summarise_tasks(rng: random.Random, paragraphs: list[str], n: int) -> list[str]:
    forms = ["Summarize the following text in one sentence:\n\n{p}", "What is this text about?\n\n{p}",
             "Give three bullet points that capture this passage:\n\n{p}", "Write a title for this text:\n\n{p}"]
    good = [p for p in paragraphs if 30 <= len(p.split()) <= 160]
    return [rng.choice(forms).format(p=rng.choice(good)) for _ in range(n)] if good else []


def list_advice_fact_tasks(rng: random.Random, n: int) -> list[str]:
    forms = [
        lambda: f"List {rng.randint(3, 7)} things you can do with a {_pick(rng, 'noun')}.",
        lambda: f"Give me some advice on how to {_pick(rng, 'verb')} better.",
        lambda: f"What are some facts about the {_pick(rng, 'noun')}?",
        lambda: f"Name {rng.randint(3, 6)} words that mean the same as '{_pick(rng, 'adjective')}'.",
        lambda: f"What is the opposite of '{_pick(rng, 'adjective')}'? Use it in a sentence.",
        lambda: f"Define the word '{_pick(rng, 'noun')}' and give an example.",
        lambda: f"Write a short story that includes a {_pick(rng, 'adjective')} {_pick(rng, 'noun')}.",
        lambda: f"Why might someone want to {_pick(rng, 'verb')} every day?",
        lambda: f"Describe a {_pick(rng, 'adjective')} {_pick(rng, 'noun')} in a few sentences.",
        lambda: f"Compare a {_pick(rng, 'noun')} and a {_pick(rng, 'noun')}.",
    ]
    return [rng.choice(forms)() for _ in range(n)]


_FOLLOWUPS = ["Can you explain that more simply?", "Give me an example.", "Can you make that shorter?",
              "Why is that?", "Tell me more.", "Can you put that in a list?", "What else should I know?",
              "Thanks! Can you summarize that in one sentence?"]


def followups(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(_FOLLOWUPS) for _ in range(n)]


def ngrams(text: str, n: int = 6) -> set[tuple[str, ...]]:
    w = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def far_overlap(prompt: str, n: int = 6) -> bool:
    """True when `prompt` shares an n-word sequence with a far-split prompt (such prompts are
    dropped from training data, so the far split stays independent of every training source)."""
    from training.far_prompts import FAR_PROMPTS

    return bool(ngrams(prompt, n) & _far_ngrams(n, tuple(FAR_PROMPTS)))


@cache
def _far_ngrams(n: int, prompts: tuple[str, ...]) -> frozenset:
    return frozenset(g for p in prompts for g in ngrams(p, n))
