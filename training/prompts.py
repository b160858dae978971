"""Prompts written for this project: task templates x topics (deterministic order)."""

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
