"""Training prompts for self-distillation, built offline and deterministically.

The heads must learn the base model's own distribution, so the prompts only have to cover the
kinds of request users send; the answers come from the model itself (see :mod:`.data`). Prompts are
templates x subjects across categories (explanations, how-to, lists, stories, code, rewriting,
Q&A, comparisons, definitions), plus text taken from the Python standard library's own docstrings
(rewrite / summarise / explain requests), which is available offline on every machine.

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


def available() -> int:
    """How many distinct training prompts the generator can produce."""
    return len(_all_prompts())
