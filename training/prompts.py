"""Prompts written for this project: task templates x topics (deterministic order)."""

import random

TOPICS = [
    "photosynthesis", "black holes", "the French Revolution", "machine learning", "volcanoes",
    "the water cycle", "coffee", "chess", "the human heart", "electric cars", "honeybees",
    "the Roman Empire", "climate change", "the internet", "meditation", "bread baking",
    "the Moon", "recycling", "jazz music", "earthquakes", "vaccines", "the stock market",
    "rainforests", "sleep", "solar panels", "the printing press", "octopuses", "gravity",
    "time management", "the Olympic Games", "DNA", "public libraries", "bicycles",
    "the Great Wall of China", "rain", "friendship", "prime numbers", "deserts",
    "airplanes", "tea",
]

TEMPLATES = [
    "Explain {t} in simple terms.",
    "Write three short facts about {t}.",
    "Give a one-paragraph summary of {t}.",
    "What are the main benefits of learning about {t}?",
    "Write a short poem about {t}.",
    "Describe {t} to a ten-year-old.",
    "List some common misconceptions about {t}.",
]

EXTRA = [
    "What is 12 times 7?", "Write a haiku about autumn.", "How do I boil an egg?",
    "Translate 'good morning' into Spanish and French.", "Give me a tip for studying.",
    "What is the capital of Japan?", "Write a Python function that adds two numbers.",
    "Suggest a name for a pet cat.", "How many days are in a leap year?",
    "Write a short thank-you note to a teacher.",
]


def all_prompts() -> list[str]:
    out = [tpl.format(t=t) for t in TOPICS for tpl in TEMPLATES]
    return out + EXTRA


# Training-only prompts: new templates over the same topics, and new topics over all templates.
# They never include a held-out prompt (the held-out split is the tail of the fixed shuffle of
# `all_prompts()`), so adding them widens the training data without touching the evaluation set.
MORE_TOPICS = [
    "glaciers", "the immune system", "bridges", "penguins", "the Renaissance", "rockets",
    "tides", "mushrooms", "electricity", "the Amazon river", "dinosaurs", "cheese making",
    "the periodic table", "lighthouses", "wind turbines", "the violin", "coral reefs",
    "ancient Egypt", "robots", "hurricanes", "the brain", "trains", "origami", "the Sun",
    "board games", "the ocean floor", "spiders", "chocolate", "maps", "kindness",
]

MORE_TEMPLATES = [
    "Why is {t} important?",
    "Write a short story about {t}.",
    "What are three interesting questions about {t}?",
    "How would you teach a class about {t}?",
    "Write a tweet about {t}.",
    "Compare {t} with something from everyday life.",
    "What is the history of {t}?",
    "Give me five keywords related to {t}.",
    "Write a short dialogue between two friends about {t}.",
    "What should a beginner know about {t}?",
]


def train_only_prompts() -> list[str]:
    held = set(all_prompts())
    out = [tpl.format(t=t) for t in TOPICS for tpl in MORE_TEMPLATES]
    out += [tpl.format(t=t) for t in MORE_TOPICS for tpl in TEMPLATES + MORE_TEMPLATES]
    return [p for p in out if p not in held]


# Third widening (`--wide`): many more topics and task templates, same rule --
# never a held-out prompt. Topics span science, daily life, history, arts, tech and places;
# templates span explaining, listing, creative writing, advice, comparison and short answers.
WIDE_TOPICS = [
    "snowflakes", "the stock exchange", "gardening", "sharks", "the Eiffel Tower", "submarines",
    "rainbows", "the piano", "yoga", "elephants", "nuclear energy", "the Middle Ages", "camping",
    "video games", "the Pyramids", "antibiotics", "owls", "bamboo", "marathons", "the alphabet",
    "money", "clouds", "the Industrial Revolution", "whales", "smartphones", "pizza", "tornadoes",
    "the Milky Way", "soccer", "ants", "democracy", "recycling plastic", "the moon landing",
    "batteries", "hiking", "the Vikings", "fossils", "magnets", "podcasts", "kites", "sunflowers",
    "the Arctic", "blood", "cooking pasta", "the telescope", "wolves", "calendars", "volunteering",
    "cryptography", "rivers", "butterflies", "the Silk Road", "photography", "vitamins", "castles",
    "deep sea creatures", "the telephone", "running shoes", "fractions", "the Sahara", "pandas",
    "weather forecasting", "libraries in the digital age", "the heart rate", "the compass",
    "poetry", "salt", "the skeleton", "lightning", "ancient Greece", "cats", "dogs", "horses",
    "the human eye", "sound waves", "clocks", "the Pacific Ocean", "rice", "the bicycle helmet",
    "first aid", "the solar system", "cartoons", "origami cranes", "musical instruments",
    "space stations", "coral", "frogs", "the metric system", "ice cream", "the Himalayas",
    "3D printing", "mountains", "the postal service", "wind", "cotton", "the microscope",
    "habits", "public speaking", "email", "teamwork", "saving money", "learning a language",
    "the Statue of Liberty", "apples", "thunderstorms", "airports", "tomatoes", "sunscreen",
    "bees and flowers", "the human skin", "comets", "sand", "the zebra", "the kangaroo",
    "wildfires", "a healthy breakfast", "computer viruses", "the speed of light", "shadows",
    "fireworks", "the Nile", "quilts", "the guitar", "mathematics", "writing a letter",
]

WIDE_TEMPLATES = [
    "Tell me something surprising about {t}.",
    "Write a limerick about {t}.",
    "Explain {t} in two sentences.",
    "What are the pros and cons of {t}?",
    "Write a short advertisement for {t}.",
    "Summarize what scientists know about {t}.",
    "Give three tips related to {t}.",
    "Write a riddle whose answer is {t}.",
    "How has {t} changed over time?",
    "Describe {t} using only simple words.",
    "Write a short news headline and first sentence about {t}.",
    "What would the world be like without {t}?",
    "Make a short quiz with two questions about {t}.",
    "Write the opening line of a novel about {t}.",
    "Explain why people find {t} interesting.",
    "List the steps to learn more about {t}.",
    "Write a short speech about {t}.",
    "What are some fun activities involving {t}?",
    "Give an analogy that explains {t}.",
    "Write a diary entry about a day spent with {t}.",
    "What are common questions children ask about {t}?",
    "Describe {t} in the style of a weather report.",
    "Write a short song chorus about {t}.",
    "What careers are connected to {t}?",
    "Explain {t} to someone from the year 1800.",
]


def wide_train_prompts() -> list[str]:
    """`train_only_prompts()` plus every topic x template pair of the wide lists, deduplicated,
    held-out prompts excluded. Deterministic order: the narrower lists first, then the new pairs in
    a fixed shuffle, so any prefix (``--limit``, or a generation cut short) spans all topics and
    templates instead of the first few topics."""
    return _widen(train_only_prompts(), TOPICS + MORE_TOPICS + WIDE_TOPICS,
                  TEMPLATES + MORE_TEMPLATES + WIDE_TEMPLATES, seed=1)


def _widen(first: list[str], topics: list[str], templates: list[str], seed: int) -> list[str]:
    """`first`, then every topic x template pair not in it and not held out, in a fixed shuffle."""
    seen = set(all_prompts()) | set(first)
    rest = []
    for p in [tpl.format(t=t) for t in topics for tpl in templates]:
        if p not in seen:
            seen.add(p)
            rest.append(p)
    random.Random(seed).shuffle(rest)
    return first + rest


# Fourth widening (`--wider`): new templates over every topic above and new topics over every
# template, same rule -- never a held-out prompt. Appended after the wide set in its own fixed
# shuffle, so `--resume` on a split built with `--wide` generates only these.
WIDER_TOPICS = [
    "penguins in Antarctica", "the Internet of Things", "glass making", "sea turtles", "archery",
    "the Great Barrier Reef", "earthworms", "paper", "the Roman aqueducts", "hot air balloons",
    "the printing of money", "jellyfish", "chess openings", "the rain cycle in cities", "sushi",
    "the Mars rovers", "knitting", "bats", "lemons", "the Panama Canal", "skateboarding",
    "radio", "ancient China", "the human ear", "camels", "hydropower", "bird migration",
    "typewriters", "the Aurora Borealis", "volleyball", "yeast", "the Andes", "tidal pools",
    "sign language", "umbrellas", "the first computers",
]

WIDER_TEMPLATES = [
    "Write a short guide to {t} for a curious beginner.",
    "What is one thing most people get wrong about {t}?",
    "Write four bullet points about {t}.",
    "Explain how {t} works, step by step.",
    "Write a short thank-you letter to {t}.",
    "What questions would an expert on {t} ask?",
    "Give a short example that shows {t}.",
    "Write a fun fact about {t} and explain it.",
]


def wider_train_prompts() -> list[str]:
    """`wide_train_prompts()` plus the fourth widening's new topic x template pairs (deduplicated,
    held-out prompts excluded), those in a fixed shuffle of their own."""
    return _widen(wide_train_prompts(), TOPICS + MORE_TOPICS + WIDE_TOPICS + WIDER_TOPICS,
                  TEMPLATES + MORE_TEMPLATES + WIDE_TEMPLATES + WIDER_TEMPLATES, seed=2)


# The novel split (`training.data --novel`, `training.eval_tpf --split novel`): topics and task
# templates that no training list above uses, paired only with each other, so no training prompt
# shares a topic or a template with them. The held-out split (a random 60 of `all_prompts()`)
# measures prompts whose topic and template both occur in training in other pairings; this one
# measures prompts unlike anything trained on, closer to what a deployment sees.
NOVEL_TOPICS = [
    "the Faroe Islands", "the water wheel", "carpentry", "the Dead Sea", "kayaking",
    "the abacus", "glow worms", "the Trans-Siberian Railway", "maple syrup", "the harmonica",
]

NOVEL_TEMPLATES = [
    "What is the most important idea behind {t}?",
    "Write a short postcard message about {t}.",
    "Give two reasons someone might enjoy {t}.",
    "Explain {t} as if you were a museum guide.",
    "What might surprise a visitor about {t}?",
    "Write a short FAQ entry about {t}.",
]


def novel_prompts() -> list[str]:
    """NOVEL_TEMPLATES x NOVEL_TOPICS (60), in a fixed shuffle; disjoint from every training list."""
    out = [tpl.format(t=t) for t in NOVEL_TOPICS for tpl in NOVEL_TEMPLATES]
    random.Random(3).shuffle(out)
    return out
