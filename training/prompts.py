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
