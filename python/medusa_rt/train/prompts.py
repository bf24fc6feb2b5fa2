"""Training prompts for self-distillation, built offline and deterministically.

The heads must learn the base model's own distribution, so the prompts only have to cover the
kinds of request users send; the answers come from the model itself (see :mod:`.data`). Prompts are
templates x subjects across categories (explanations, how-to, lists, stories, code, rewriting,
Q&A, comparisons, definitions), plus text taken from the Python standard library's own docstrings
(rewrite / summarise / explain requests), which is available offline on every machine; and,
separately (:func:`everyday_prompts`), everyday requests the templates lack: advice, word problems,
rewriting everyday sentences, everyday questions.

Nothing here overlaps the held-out evaluation set (``medusa_rt/data/eval_prompts.json``); a test
checks that.
"""

from __future__ import annotations

import functools
import json
import random
import re
import subprocess
import sys
from typing import Dict, Iterator, List, Tuple

SCIENCE = """photosynthesis|gravity|the water cycle|plate tectonics|black holes|DNA replication|the immune system|
volcanoes|ocean tides|rainbows|magnetism|static electricity|the greenhouse effect|earthquakes|evolution by natural
selection|the periodic table|chemical bonds|nuclear fusion|solar eclipses|the phases of the moon|sound waves|
friction|cell division|vaccines|antibiotics|the nervous system|digestion|the carbon cycle|erosion|weather fronts|
hurricanes|the speed of light|atoms|electric circuits|batteries|lightning|glaciers|coral reefs|bees and pollination|
the human heart|sleep|memory in the brain|the Big Bang|comets|the seasons|clouds|fossils|enzymes|viruses|bacteria"""
TECH = """the internet|a web browser|encryption|passwords|cloud computing|a CPU|computer memory|an operating system|
databases|machine learning|a search engine|email|GPS|Wi-Fi|Bluetooth|a compiler|version control with git|
open-source software|spreadsheets|solar panels|electric cars|3D printing|barcodes|QR codes|touchscreens|
digital cameras|streaming video|compression|backups|two-factor authentication|APIs|unit tests|recursion|
hash tables|sorting algorithms|binary numbers|floating point numbers|virtual machines|containers|the command line"""
SOCIETY = """democracy|taxes|inflation|interest rates|supply and demand|the stock market|insurance|a budget|
recycling|public libraries|the printing press|the Roman Empire|the Renaissance|the Industrial Revolution|
ancient Egypt|the Silk Road|the Olympic Games|the United Nations|elections|human rights|volunteering|
urban planning|public transport|renewable energy|climate change|biodiversity|national parks|museums|
the scientific method|critical thinking|philosophy|poetry|jazz music|classical music|painting|architecture|
photography|cooking|nutrition|exercise|meditation|teamwork|leadership|negotiation|time management|
learning a language|friendship|kindness|honesty|curiosity"""
HOWTO = """bake bread|make a cup of tea|plant a tree|start a vegetable garden|write a resume|prepare for a job
interview|learn to swim|ride a bicycle|change a flat tire|save money|make a budget|study for an exam|take notes
in class|write an essay|give a presentation|organize a closet|clean a kitchen|fold a shirt|tie a tie|sew a
button|paint a room|set up a fish tank|care for a houseplant|train a puppy|brush a cat|make a paper airplane|
build a birdhouse|start running|stretch before exercise|improve sleep|reduce stress|make new friends|write a thank
you note|plan a birthday party|pack for a trip|read a map|learn to juggle|start a journal|cook rice|make pancakes|
make a salad|brew coffee|wash a car|back up a computer|create a strong password|write a cover letter|learn to
type faster|keep a conversation going|apologize sincerely|stay focused while working"""
STORY = """a dragon who was afraid of fire|a robot learning to paint|a lost kitten in a big city|a girl who could
talk to trees|a lighthouse keeper|a boy who found a map|two friends building a raft|a wizard who lost his hat|
a bakery that opened at midnight|a squirrel planning a winter feast|an astronaut on Mars|a detective mouse|a
village without music|a clock that ran backwards|a shy giant|a knight and a talking horse|a garden that grew
overnight|a message in a bottle|a snowman who wanted to see summer|a train that could fly|a pirate who hated
the sea|a library at the bottom of the ocean|an old man and his dog|a fox and a crow|a city of cats|the last
leaf on a tree|a kite that flew away|a magic paintbrush|a turtle who wanted to race|a star that fell to earth"""
CODE = """reverses a string|checks whether a number is prime|computes the factorial of n|returns the n-th
Fibonacci number|counts the vowels in a string|finds the largest element of a list|removes duplicates from a
list|checks whether a string is a palindrome|sorts a list of dictionaries by a key|merges two sorted lists|
computes the average of a list of numbers|reads a text file and counts its words|converts Celsius to
Fahrenheit|finds the second smallest number in a list|flattens a nested list|checks whether two strings are
anagrams|returns the greatest common divisor of two numbers|counts how often each word appears in a text|
validates an email address with a regular expression|implements binary search|implements bubble sort|
transposes a matrix|sums the digits of an integer|generates all permutations of a list|converts a decimal
number to binary|capitalizes every word in a sentence|finds common elements of two lists|returns the
longest word in a sentence|chunks a list into pieces of size n|computes the median of a list"""
LANGS = ["Python", "JavaScript", "C", "Java", "Rust", "Go", "C++", "Bash"]
THINGS = """a cat and a dog|tea and coffee|trains and planes|summer and winter|books and films|cities and the
countryside|Python and JavaScript|renting and buying a home|walking and cycling|paper books and e-books|
the sun and the moon|oceans and lakes|email and letters|working from home and working in an office|
lists and tuples in Python|TCP and UDP|RAM and a hard drive|a virus and a bacterium|weather and climate|
speed and velocity"""
WORDS = """serendipity|resilience|empathy|ambiguity|nostalgia|integrity|entropy|paradox|metaphor|algorithm|
ecosystem|democracy|hypothesis|irony|momentum|symmetry|catalyst|consensus|dialect|equilibrium|folklore|
gratitude|habitat|innovation|justice|kinetic|latitude|migration|narrative|optimism|perspective|quarantine|
renaissance|sustainability|tradition|utopia|velocity|wisdom|zenith|compassion|curiosity|diligence|
eloquence|frugality|humility|patience|perseverance|skepticism|tenacity|vulnerability"""

TEMPLATES: Dict[str, List[str]] = {
    "explain": ["Explain {s} in simple terms.", "How does {s} work?", "Can you explain {s} to a ten-year-old?",
                "Give a short explanation of {s}.", "What is {s} and why does it matter?",
                "Describe {s} in a few sentences.", "Why is {s} important?"],
    "howto": ["How do I {h}?", "Give me step-by-step instructions to {h}.", "What is the best way to {h}?",
              "Write a short guide on how to {h}.", "I want to {h}. Where should I start?",
              "List the steps to {h}."],
    "list": ["List five facts about {s}.", "Give me three interesting things about {s}.",
             "What are the main benefits of {s}?", "List some common misconceptions about {s}.",
             "Name five tips for beginners interested in {s}.", "What are the pros and cons of {s}?",
             "List ten words related to {s}."],
    "story": ["Write a short story about {t}.", "Tell me a bedtime story about {t}.",
              "Write a poem about {t}.", "Write the opening paragraph of a novel about {t}.",
              "Write a fable about {t}, with a moral at the end.", "Describe a day in the life of {t}."],
    "code": ["Write a {l} function that {c}.", "Show me how to write a program in {l} that {c}.",
             "Write {l} code that {c}, and explain how it works.", "How would you write a function that {c} in {l}?"],
    "compare": ["What is the difference between {x}?", "Compare {x}.", "Which is better: {x}? Explain.",
                "What do {x} have in common?"],
    "define": ["What does the word \"{w}\" mean?", "Define {w} and use it in a sentence.",
               "Give the meaning of \"{w}\" with two examples.", "Explain the word {w} to a student."],
    "qa": ["Who invented {s}?", "When did people first understand {s}?", "Is {s} dangerous?",
           "What would happen without {s}?", "How has {s} changed over time?", "What is a common question about {s}?"],
    "rewrite": ["Rewrite this sentence in simpler words: {d}", "Summarize in one sentence: {d}",
                "Make this more formal: {d}", "Translate this technical text into plain English: {d}",
                "Explain what this means: {d}", "Write a friendly explanation of this: {d}"],
}

_STDLIB_MODULES = ["os", "os.path", "json", "re", "math", "random", "string", "collections", "itertools", "functools",
                   "datetime", "time", "pathlib", "shutil", "subprocess", "textwrap", "statistics", "csv", "heapq",
                   "bisect", "copy", "pickle", "hashlib", "base64", "urllib.parse", "argparse", "logging", "threading",
                   "queue", "socket", "zipfile", "tarfile", "tempfile", "glob", "fnmatch", "difflib", "decimal",
                   "fractions", "uuid", "enum", "dataclasses", "typing", "inspect", "operator", "contextlib",
                   "calendar", "secrets", "struct", "io", "gzip", "sqlite3", "email.utils", "html", "unicodedata"]


def _split(block: str) -> List[str]:
    return [w.strip() for w in " ".join(block.split()).split("|") if w.strip()]


# Run in a fresh, isolated interpreter: what ``dir(module)`` lists depends on what the process has
# imported before (submodules become attributes, libraries patch functions), and the prompt set
# must not depend on who asks for it.
_COLLECT = r"""
import importlib, json, re, sys, warnings
modules, limit = json.loads(sys.argv[1])
out, seen = [], set()
for name in modules:
    try:
        mod = importlib.import_module(name)
    except Exception:  # a module missing on some platform is simply skipped
        continue
    for attr in sorted(dir(mod)):
        if attr.startswith("_"):
            continue
        with warnings.catch_warnings():  # deprecated aliases (typing.io, ...) warn on access
            warnings.simplefilter("ignore")
            doc = getattr(getattr(mod, attr, None), "__doc__", None)
        if not isinstance(doc, str):
            continue
        m = re.match(r"(.{30,200}?[.!?])(\s|$)", " ".join(doc.strip().split()))
        if not m:
            continue
        sentence = m.group(1)
        if "(" in sentence[:20] or sentence in seen or not sentence[0].isupper():
            continue
        seen.add(sentence)
        out.append(sentence)
        if len(out) >= limit:
            break
    if len(out) >= limit:
        break
json.dump(out, sys.stdout)
"""


@functools.lru_cache(maxsize=None)
def _stdlib_sentences(limit: int) -> Tuple[str, ...]:
    args = json.dumps([_STDLIB_MODULES, limit])
    done = subprocess.run([sys.executable, "-I", "-c", _COLLECT, args], capture_output=True, text=True, check=True)
    return tuple(json.loads(done.stdout))


def stdlib_sentences(limit: int = 2000) -> List[str]:
    """First sentences of the Python standard library's docstrings (offline text for rewriting),
    collected in a fresh interpreter so that the result depends only on the Python version."""
    return list(_stdlib_sentences(limit))


def _all_prompts() -> List[Tuple[str, str]]:
    subjects = _split(SCIENCE) + _split(TECH) + _split(SOCIETY)
    fill = {"s": subjects, "h": _split(HOWTO), "t": _split(STORY), "x": _split(THINGS), "w": _split(WORDS),
            "d": stdlib_sentences()}
    out: List[Tuple[str, str]] = []
    for category, templates in TEMPLATES.items():
        for template in templates:
            if "{c}" in template:
                for c in _split(CODE):
                    for lang in LANGS:
                        out.append((category, template.format(c=c, l=lang)))
                continue
            key = re.search(r"\{(\w)\}", template).group(1)  # type: ignore[union-attr]
            for value in fill[key]:
                out.append((category, template.format(**{key: value})))
    return out


def training_prompts(n: int, seed: int = 0) -> List[Tuple[str, str]]:
    """``n`` distinct (category, prompt) pairs, balanced across categories, deterministic in seed."""
    by_cat: Dict[str, List[str]] = {}
    for cat, p in _all_prompts():
        by_cat.setdefault(cat, []).append(p)
    rng = random.Random(seed)
    for ps in by_cat.values():
        rng.shuffle(ps)
    out: List[Tuple[str, str]] = []
    iters: Dict[str, Iterator[str]] = {c: iter(ps) for c, ps in by_cat.items()}
    while len(out) < n and iters:
        for cat in list(iters):
            p = next(iters[cat], None)
            if p is None:
                del iters[cat]
                continue
            out.append((cat, p))
            if len(out) == n:
                break
    return out


# Everyday requests (everyday_prompts): advice, word problems, rewriting everyday sentences, and
# everyday questions, kinds of request the templates above do not cover.
NAMES = _split("""Anna|Ben|Carlos|Dina|Emil|Fatima|George|Hana|Ivan|Julia|Kofi|Lena|Marco|Nora|Omar|Priya|Quinn|
Rosa|Sam|Tara""")
ITEMS = _split("apples|pencils|stickers|marbles|cookies|books|cards|stamps|oranges|balloons")
PROBLEMS = """keep forgetting where I put my keys|can't fall asleep before midnight|get distracted every time I study|
feel tired every afternoon at work|spend too much money on takeaway food|never have time to read|find it hard to
say no to people|get stressed before exams|have trouble waking up early|feel lonely since I moved to a new city|
procrastinate on big projects|argue with my sister a lot|can't stick to a workout routine|have a messy desk|
feel anxious when I talk on the phone|waste hours on my phone every evening|forget people's names right after
meeting them|have a noisy neighbour|struggle to drink enough water|always run late for appointments|
get bored at my job|have too many unread emails|find meetings unproductive|eat too much sugar|feel nervous on first
dates|have a long commute|keep losing at chess|can't focus in open-plan offices|get headaches after using the
computer|have trouble making decisions"""
ACTIVITIES = """running my first 5k race|hosting a dinner party|learning to cook|starting a small business|
traveling alone|moving to another country|learning to draw|writing a novel|growing tomatoes on a balcony|
saving for a holiday|
studying for a driving test|learning to play the guitar|working from home|keeping a journal|teaching a child to read|
taking better photos with a phone|speaking at a wedding|camping for the first time|making friends at a new school|
running an online meeting|going back to school as an adult|organizing a family reunion|adopting a cat|
learning to meditate|buying a used car|choosing a laptop|painting a bedroom|decluttering a house|planning a road trip|
volunteering at an animal shelter"""
DECISIONS = """buying a house|changing careers|getting a pet rabbit|taking a gap year|joining a gym|buying an electric
bike|renting an apartment with friends|starting a master's degree|switching to a vegetarian diet|learning a second
language|taking out a loan|moving to the countryside|accepting a job offer abroad|starting a podcast|selling my car"""
PEOPLE = """my neighbour|the teacher|our manager|my brother|the children|the old man next door|the new student|
my best friend|the bus driver|the team|our landlord|the doctor|my grandmother|the shop owner|the students"""
EVENTS = """forgot to lock the front door last night|painted the fence blue over the weekend|lost the tickets for
the concert|finished the report two days early|broke the coffee machine this morning|won first prize at the
science fair|moved the meeting to Thursday afternoon|baked a huge cake for the party|missed the last train home|
found a wallet in the park and returned it|planted six trees along the road|cancelled the trip because of the
storm|spilled juice on the new carpet|organized a book sale for the library|fixed the broken bicycle in ten
minutes|asked everyone to arrive at eight o'clock sharp|left the windows open during the rain|sold all the
lemonade before noon|wrote a long letter to the mayor|cleaned the whole garage in one day"""
GOALS = """save energy at home|eat more vegetables|make mornings less rushed|keep a small apartment tidy|spend less time
on social media|remember what I read|make a long flight more comfortable|keep in touch with old friends|be more
patient with my kids|feel more confident at work|cut down on plastic waste|keep my phone battery healthy|get
more done before lunch|make a small room feel bigger|prepare healthy lunches for the week|reduce my electricity bill|
stay warm in winter without heating|keep a conversation going with shy people|make my garden attract birds|
enjoy cooking more|sleep better in hot weather|learn new words every day|calm down after an argument|motivate a team
of volunteers|keep my bike in good condition|make a birthday special on a small budget|help an elderly parent use
email|protect my online accounts|spend a rainy weekend|prepare for a long hike"""
SITUATIONS = """keeps borrowing money and not paying it back|talks loudly on the phone next to my desk|always cancels
plans at the last minute|never helps with the dishes|gives me advice I did not ask for|is upset that I missed
their party|takes credit for my work|wants to visit every weekend|keeps sending me chain messages|parks in my spot"""
PHENOMENA = """do dogs wag their tails|do onions make people cry|does the sea taste salty|do leaves fall in autumn|
do we get goosebumps|does soap remove grease|do people yawn|do birds fly south in winter|do bubbles pop|does metal
feel cold to the touch|do we dream at night|does popcorn pop|does the moon change shape|do stars twinkle|do people
get hiccups|does bread go stale|do cats land on their feet|do apples turn brown when cut|do our voices sound
different on recordings|do some people snore"""
COLLECTIONS = """animals that live in the desert|fruits that are red|sports played with a ball|instruments in an
orchestra|countries in South America|rivers in Europe|things to pack for the beach|games to play at a party|
vegetables that grow underground|birds that cannot fly|famous scientists|jobs that help other people|
ways to say thank you|things to do on a rainy day|hobbies you can do at home|kitchen tools|insects that help
farmers|cities with famous towers|musical styles|healthy breakfast ideas"""
INSTRUCTIONS = ["Rewrite this so it sounds friendlier: {e}", "Make this sentence sound formal: {e}",
                "Explain this sentence in very simple words: {e}", "Say this in fewer words: {e}",
                "Rewrite this in the passive voice: {e}", "Turn this into a short, polite text message: {e}",
                "Paraphrase this sentence: {e}", "Make this sound more exciting: {e}",
                "Rewrite this as a question: {e}", "Fix the spelling and grammar: {b}"]


def _broken(sentence: str, rng: random.Random) -> str:
    """The sentence with two kinds of mistakes (lower case, dropped articles, wrong verb forms,
    a stray plural), for grammar-fixing requests."""
    words = sentence.rstrip(".").split()
    fixes = [lambda w: [x.lower() for x in w], lambda w: [x for x in w if x not in ("the", "a")],
             lambda w: [{"was": "were", "were": "was", "is": "are", "has": "have"}.get(x, x) for x in w],
             lambda w: [x + "s" if i == 1 else x for i, x in enumerate(w)]]
    for f in rng.sample(fixes, 2):
        words = f(words)
    return " ".join(words)


def _word_problem(rng: random.Random) -> str:
    """A short word problem of one of ten kinds, with random names and numbers."""
    k = rng.randrange(10)
    a, b, c = rng.randint(2, 12), rng.randint(2, 9), rng.randint(2, 12)
    n1, n2, n3 = rng.sample(NAMES, 3)
    if k == 0:
        it = rng.choice(ITEMS)
        return f"{n1} has {a} {it} and gets {b} bags with {c} {it} in each. How many {it} does {n1} have now?"
    if k == 1:
        pct, of = rng.choice([5, 10, 15, 20, 25, 30, 40, 60, 75]), rng.randint(2, 40) * 10
        return f"What is {pct} percent of {of}? Explain each step."
    if k == 2:
        return f"A garden is {a + 2} meters long and {b + 1} meters wide. Work out its area and its perimeter."
    if k == 3:
        h, m = rng.randint(6, 20), rng.choice([0, 10, 15, 20, 30, 45, 50])
        d = rng.choice([25, 40, 55, 75, 90, 105, 130])
        return f"A bus leaves at {h}:{m:02d} and the ride takes {d} minutes. At what time does it arrive?"
    if k == 4:
        nums = rng.sample(range(1, 100), rng.randint(5, 7))
        return f"Put these numbers in order from largest to smallest: {', '.join(map(str, nums))}."
    if k == 5:
        adj = rng.choice(["taller", "older", "faster", "heavier"])
        least = {"taller": "shortest", "older": "youngest", "faster": "slowest", "heavier": "lightest"}[adj]
        return f"{n1} is {adj} than {n2}, and {n2} is {adj} than {n3}. Who is the {least}?"
    if k == 6:
        price, off = rng.randint(3, 20) * 10, rng.choice([10, 20, 25, 30, 50])
        return f"A jacket costs {price} dollars and is sold at {off} percent off. What is the new price?"
    if k == 7:
        return (f"If {a} friends share {a * c} sweets equally, how many sweets does each friend get? "
                "Show your reasoning.")
    if k == 8:
        return f"How many minutes are there in {b} hours and {rng.randint(1, 59)} minutes?"
    nums = rng.sample(range(2, 50), 4)
    return f"What is the average of {', '.join(map(str, nums[:-1]))} and {nums[-1]}?"


def everyday_prompts(per_kind: int, seed: int = 0) -> List[Tuple[str, str]]:
    """Up to ``per_kind`` (category, prompt) pairs of each everyday kind of request the templates
    above lack: advice on personal situations ("advice"), short word problems ("reasoning"),
    rewriting everyday sentences with varied instructions, some of them broken on purpose for
    grammar fixing ("rewrite"), and everyday why / name-some questions ("everyday", 120 at most).
    Deterministic in ``seed``."""
    if per_kind < 0:
        raise ValueError(f"per_kind must be >= 0, got {per_kind}")
    rng = random.Random(seed)
    advice = ([f"I {p}. What can I do?" for p in _split(PROBLEMS)] +
              [f"Do you have any tips for {a}?" for a in _split(ACTIVITIES)] +
              [f"What should I think about before {d}?" for d in _split(DECISIONS)] +
              [f"How do I get better at {a}?" for a in _split(ACTIVITIES)] +
              [f"What are some ways to {g}?" for g in _split(GOALS)] +
              [f"How can I {g}?" for g in _split(GOALS)] +
              [f"My {p} {s}. How should I handle it?" for p in ("friend", "coworker", "roommate", "cousin")
               for s in _split(SITUATIONS)])
    everyday = ([f"Why {x}?" for x in _split(PHENOMENA)] +
                [f"Name {n} {c}." for c in _split(COLLECTIONS) for n in ("three", "five", "eight")] +
                [f"Give me a short list of {c}." for c in _split(COLLECTIONS)] +
                [f"Why {x}? Explain it simply." for x in _split(PHENOMENA)])
    sentences = [f"{p[0].upper() + p[1:]} {e}." for p in _split(PEOPLE) for e in _split(EVENTS)]
    rewrite = []
    for s in sentences:
        ins = rng.choice(INSTRUCTIONS)
        rewrite.append(ins.format(e=s, b=_broken(s, rng)))
    reason: List[str] = []
    seen = set()
    while len(reason) < per_kind:
        p = _word_problem(rng)
        if p not in seen:
            seen.add(p)
            reason.append(p)
    rng.shuffle(advice)
    rng.shuffle(everyday)
    rng.shuffle(rewrite)
    return ([("advice", p) for p in advice[:per_kind]] + [("reasoning", p) for p in reason] +
            [("rewrite", p) for p in rewrite[:per_kind]] + [("everyday", p) for p in everyday[:per_kind]])


def available() -> int:
    """How many distinct training prompts the generator can produce."""
    return len(_all_prompts())
