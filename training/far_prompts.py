"""The far evaluation split: everyday requests written by hand for evaluation only.

Owns: `FAR_PROMPTS`. No training generator produces these or their phrasings: the training data come
from the topic x template grids of `training.prompts`, from requests the base model writes about
random seed words, and from the task generators of `training.generators` (random numbers, names
and functions in their own templates). This split is the figure that counts (issue "A demo
adapter that generalises"): it is what a user types. Fixed and committed; never trained on.
"""

FAR_PROMPTS = [
    # explanations
    "Why do onions make people cry when they cut them?",
    "How does a refrigerator keep food cold?",
    "What is the difference between a virus and a bacterium?",
    "Can you explain what inflation means for my savings?",
    "Why does ice float on water?",
    "How do noise-cancelling headphones work?",
    "What happens in my body when I drink coffee?",
    "Explain recursion to someone who has never programmed.",
    # poems and creative writing
    "Write a haiku about a train leaving the station at night.",
    "Write a limerick about a cat who learned to play the piano.",
    "Write four lines of rhyming verse for a friend's birthday card.",
    "Write the opening paragraph of a mystery novel set in a snowy village.",
    "Invent a short fable with a fox and a crow, and give it a moral.",
    "Describe a sunset over the sea without using the word 'orange'.",
    # code
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "How do I read a CSV file with pandas and print the first five rows?",
    "Write a JavaScript function that removes duplicates from an array.",
    "Write a SQL query that finds the ten customers with the highest total order value.",
    "What does the git command 'git rebase -i HEAD~3' do?",
    "Write a bash one-liner that counts the lines in every .txt file in a folder.",
    "Explain the difference between a list and a tuple in Python.",
    "Write a regular expression that matches a US ZIP code.",
    "Fix this Python code: for i in range(10) print(i)",
    # arithmetic and word problems
    "What is 48 divided by 6, plus 15?",
    "If a shirt costs $25 and is on sale for 20% off, what is the sale price?",
    "A train travels 180 kilometres in 2 hours. What is its average speed?",
    "What is the square root of 144?",
    "How many minutes are there in three and a half hours?",
    "I have 3 apples and buy 2 bags of 6 apples each. How many apples do I have now?",
    "What is 15% of 240?",
    "Convert 100 degrees Fahrenheit to Celsius.",
    # unit conversion and facts
    "How many ounces are in a pound?",
    "Convert 3 cups of flour to grams, roughly.",
    "How tall is Mount Everest in feet?",
    "Who painted the Mona Lisa?",
    "What is the largest planet in our solar system?",
    "In what year did the first person walk on the Moon?",
    # emails, letters and rewriting
    "Write a polite email asking my landlord to fix a leaking tap.",
    "Write a short apology message to a coworker for missing a meeting.",
    "Write a cover letter opening for a junior data analyst job.",
    "Rewrite this sentence to sound more professional: 'hey, send me that report asap'.",
    "Make this sentence shorter: 'Due to the fact that it was raining, we decided to stay inside.'",
    "Correct the grammar: 'Me and him goes to the store yesterday.'",
    # translation
    "Translate 'Where is the nearest train station?' into German.",
    "How do you say 'thank you very much' in Japanese?",
    "Translate 'I would like a table for two, please' into Spanish.",
    "What does the French phrase 'c'est la vie' mean?",
    # lists and planning
    "Make a packing list for a three-day beach holiday.",
    "Give me a grocery list for a week of vegetarian dinners.",
    "Plan a one-day sightseeing itinerary for Rome.",
    "Suggest five names for a coffee shop that also sells books.",
    "What should I bring to a job interview?",
    "List the steps to change a flat bicycle tyre.",
    # advice and how-to
    "How can I fall asleep faster at night?",
    "What are some good ways to save money on groceries?",
    "How do I politely say no to extra work from my boss?",
    "How do I get a red wine stain out of a white shirt?",
    "What is a good beginner workout I can do at home without equipment?",
    "How should I prepare for my first marathon?",
    # summarising and comparing given text
    "Summarise in one sentence: The city council voted on Tuesday to extend the bus network to the "
    "northern suburbs, a project that will cost 40 million dollars and take three years to finish.",
    "Give the main idea of this text: Bees pollinate many of the crops we eat. Without them, fruits "
    "like apples and almonds would become rare and expensive.",
    "Compare cats and dogs as pets in a short table.",
    "Is working from home better than working in an office? Weigh both sides.",
    # multi-step / other formats
    "Write a recipe for pancakes with a list of ingredients and numbered steps.",
    "Turn this into a JSON object: name Alice, age 30, city Paris.",
    "Give me three interview questions for a software engineer and explain what each one tests.",
    "Tell me a joke about programmers.",
    "Write a short product description for a waterproof hiking backpack.",
    "Explain the rules of tic-tac-toe.",
    "What is a good name for a golden retriever puppy, and why?",
    "Describe your ideal weekend in three sentences.",
]
