"""Project-written English sentences and aligned English→French pairs.

Everything here is generated from a small template grammar and a hand-written vocabulary (no copied text):

* :func:`english_sentence` draws one natural, short English sentence (4–14 words; numbers and digit strings
  spelled out), mixing the parallel grammar below with English-only templates (times, phone numbers, ages,
  weather, requests...).
* :func:`parallel_pair` draws one English sentence with its French translation. The French side is built from the
  same parse as the English side, so gender/number agreement, elision (``l'``, ``j'``, ``n'``, ``d'``), negation
  (``ne ... pas`` with ``de`` for indefinite objects) and verb conjugation are handled by rule, not by lookup.
* :func:`unique_sentences` / :func:`unique_pairs` return seeded, de-duplicated lists used to build disjoint splits.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

MIN_WORDS = 4
MAX_WORDS = 14

_FR_VOWELS = tuple("aeiouyàâäéèêëîïôöùûüœh")
_EN_VOWELS = tuple("aeiou")


# --------------------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------------------
_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_FR_SMALL = ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix", "onze", "douze"]


def number_to_words(n: int) -> str:
    """Spell a cardinal number 0..9999 in English words ("forty two", "three hundred and five")."""
    if not 0 <= n <= 9999:
        raise ValueError(f"number_to_words supports 0..9999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        head = f"{_ONES[hundreds]} hundred"
        return head if rest == 0 else f"{head} and {number_to_words(rest)}"
    thousands, rest = divmod(n, 1000)
    head = f"{_ONES[thousands]} thousand"
    if rest == 0:
        return head
    return f"{head} and {number_to_words(rest)}" if rest < 100 else f"{head} {number_to_words(rest)}"


def digits_to_words(digits: str) -> str:
    """Spell a digit string one digit at a time ("4071" -> "four zero seven one")."""
    if not digits.isdigit():
        raise ValueError(f"digits_to_words expects only digits, got {digits!r}")
    return " ".join(_ONES[int(d)] for d in digits)


def french_number(n: int) -> str:
    """French cardinal for 0..12 (the range the parallel grammar uses)."""
    if not 0 <= n < len(_FR_SMALL):
        raise ValueError(f"french_number supports 0..{len(_FR_SMALL) - 1}, got {n}")
    return _FR_SMALL[n]


# --------------------------------------------------------------------------------------------------------------
# Lexicon of the parallel grammar
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Noun:
    """A countable noun with its English and French forms, French gender and semantic tags."""

    en: str
    en_pl: str
    fr: str
    fr_pl: str
    gender: str  # "m" | "f"
    tags: frozenset[str]


_ABSTRACT = frozenset({"message", "story"})


def _n(en: str, en_pl: str, fr: str, fr_pl: str, gender: str, tags: str) -> Noun:
    """Noun factory; adds the derived tags ``phys`` (a physical thing) and ``color`` (a coloured object)."""
    tag_set = set(tags.split())
    if en not in _ABSTRACT:
        tag_set.add("phys")
        if "food" not in tag_set:
            tag_set.add("color")
    return Noun(en, en_pl, fr, fr_pl, gender, frozenset(tag_set))


NOUNS: tuple[Noun, ...] = (
    _n("apple", "apples", "pomme", "pommes", "f", "food"),
    _n("egg", "eggs", "œuf", "œufs", "m", "food"),
    _n("cake", "cakes", "gâteau", "gâteaux", "m", "food"),
    _n("orange", "oranges", "orange", "oranges", "f", "food"),
    _n("pear", "pears", "poire", "poires", "f", "food"),
    _n("banana", "bananas", "banane", "bananes", "f", "food"),
    _n("tomato", "tomatoes", "tomate", "tomates", "f", "food"),
    _n("lemon", "lemons", "citron", "citrons", "m", "food"),
    _n("sandwich", "sandwiches", "sandwich", "sandwichs", "m", "food"),
    _n("book", "books", "livre", "livres", "m", "read carry open"),
    _n("letter", "letters", "lettre", "lettres", "f", "read carry open write"),
    _n("newspaper", "newspapers", "journal", "journaux", "m", "read carry"),
    _n("map", "maps", "carte", "cartes", "f", "read carry"),
    _n("magazine", "magazines", "magazine", "magazines", "m", "read carry"),
    _n("message", "messages", "message", "messages", "m", "read write"),
    _n("story", "stories", "histoire", "histoires", "f", "read write"),
    _n("bag", "bags", "sac", "sacs", "m", "carry open container"),
    _n("box", "boxes", "boîte", "boîtes", "f", "carry open container"),
    _n("bottle", "bottles", "bouteille", "bouteilles", "f", "carry open container"),
    _n("cup", "cups", "tasse", "tasses", "f", "carry clean container break"),
    _n("glass", "glasses", "verre", "verres", "m", "carry clean container break"),
    _n("plate", "plates", "assiette", "assiettes", "f", "carry clean break"),
    _n("key", "keys", "clé", "clés", "f", "carry"),
    _n("shirt", "shirts", "chemise", "chemises", "f", "carry clean"),
    _n("hat", "hats", "chapeau", "chapeaux", "m", "carry"),
    _n("coat", "coats", "manteau", "manteaux", "m", "carry clean"),
    _n("umbrella", "umbrellas", "parapluie", "parapluies", "m", "carry open break"),
    _n("phone", "phones", "téléphone", "téléphones", "m", "carry break"),
    _n("computer", "computers", "ordinateur", "ordinateurs", "m", "carry break"),
    _n("watch", "watches", "montre", "montres", "f", "carry break"),
    _n("pen", "pens", "stylo", "stylos", "m", "carry"),
    _n("ticket", "tickets", "billet", "billets", "m", "carry"),
    _n("ball", "balls", "ballon", "ballons", "m", "carry"),
    _n("lamp", "lamps", "lampe", "lampes", "f", "carry break"),
    _n("chair", "chairs", "chaise", "chaises", "f", "carry clean break"),
    _n("table", "tables", "table", "tables", "f", "clean"),
    _n("window", "windows", "fenêtre", "fenêtres", "f", "open clean break"),
    _n("door", "doors", "porte", "portes", "f", "open clean"),
    _n("car", "cars", "voiture", "voitures", "f", "clean vehicle break"),
    _n("bike", "bikes", "vélo", "vélos", "m", "clean vehicle break"),
    _n("bus", "buses", "bus", "bus", "m", "vehicle"),
)


@dataclass(frozen=True)
class Adjective:
    """An adjective with its four French forms; ``before`` marks French pre-nominal placement."""

    en: str
    fr_m: str
    fr_f: str
    fr_mpl: str
    fr_fpl: str
    before: bool
    requires: str | None = None  # a noun tag the adjective needs, None = any noun
    attributive: bool = True  # usable before/after a noun (False: predicate only, e.g. "vieux"/"vieil")

    def fr(self, gender: str, plural: bool) -> str:
        """The French form agreeing with ``gender`` ("m"/"f") and number."""
        if gender == "m":
            return self.fr_mpl if plural else self.fr_m
        return self.fr_fpl if plural else self.fr_f

    def fits(self, noun: Noun) -> bool:
        return self.requires is None or self.requires in noun.tags


def _a(en: str, m: str, f: str, mpl: str, fpl: str, before: bool = False, requires: str | None = None,
       attributive: bool = True) -> Adjective:
    return Adjective(en, m, f, mpl, fpl, before, requires, attributive)


ADJECTIVES: tuple[Adjective, ...] = (
    _a("small", "petit", "petite", "petits", "petites", before=True, requires="phys"),
    _a("big", "grand", "grande", "grands", "grandes", before=True, requires="phys"),
    _a("pretty", "joli", "jolie", "jolis", "jolies", before=True, requires="color"),
    _a("good", "bon", "bonne", "bons", "bonnes", before=True, requires="food"),
    _a("red", "rouge", "rouge", "rouges", "rouges", requires="color"),
    _a("blue", "bleu", "bleue", "bleus", "bleues", requires="color"),
    _a("green", "vert", "verte", "verts", "vertes", requires="color"),
    _a("black", "noir", "noire", "noirs", "noires", requires="color"),
    _a("white", "blanc", "blanche", "blancs", "blanches", requires="color"),
    _a("yellow", "jaune", "jaune", "jaunes", "jaunes", requires="color"),
    _a("heavy", "lourd", "lourde", "lourds", "lourdes", requires="phys"),
    _a("empty", "vide", "vide", "vides", "vides", requires="container"),
    _a("full", "plein", "pleine", "pleins", "pleines", requires="container"),
    _a("clean", "propre", "propre", "propres", "propres", requires="clean"),
    _a("dirty", "sale", "sale", "sales", "sales", requires="clean"),
    _a("broken", "cassé", "cassée", "cassés", "cassées", requires="break"),
    _a("fresh", "frais", "fraîche", "frais", "fraîches", requires="food"),
    _a("new", "neuf", "neuve", "neufs", "neuves", requires="carry", attributive=False),
    _a("old", "vieux", "vieille", "vieux", "vieilles", requires="color", attributive=False),
    _a("expensive", "cher", "chère", "chers", "chères", requires="phys"),
)


@dataclass(frozen=True)
class Verb:
    """A transitive verb: English base/3sg forms, French present tense (je..ils) and allowed object tags."""

    en: str
    en_3sg: str
    fr: tuple[str, str, str, str, str, str]
    objects: frozenset[str]
    imperative: bool = True


def _v(en: str, en_3sg: str, fr: str, objects: str, imperative: bool = True) -> Verb:
    forms = tuple(fr.split())
    if len(forms) != 6:
        raise ValueError(f"verb {en!r}: expected 6 French forms, got {forms}")
    return Verb(en, en_3sg, forms, frozenset(objects.split()), imperative)  # type: ignore[arg-type]


VERBS: tuple[Verb, ...] = (
    _v("like", "likes", "aime aimes aime aimons aimez aiment", "food read carry vehicle", imperative=False),
    _v("want", "wants", "veux veux veut voulons voulez veulent", "food read carry vehicle", imperative=False),
    _v("see", "sees", "vois vois voit voyons voyez voient", "food carry vehicle open", imperative=False),
    _v("have", "has", "ai as a avons avez ont", "food read carry vehicle", imperative=False),
    _v("buy", "buys", "achète achètes achète achetons achetez achètent", "food read carry vehicle"),
    _v("sell", "sells", "vends vends vend vendons vendez vendent", "carry vehicle"),
    _v("find", "finds", "trouve trouves trouve trouvons trouvez trouvent", "read carry"),
    _v("look for", "looks for", "cherche cherches cherche cherchons cherchez cherchent", "read carry vehicle"),
    _v("lose", "loses", "perds perds perd perdons perdez perdent", "carry", imperative=False),
    _v("eat", "eats", "mange manges mange mangeons mangez mangent", "food"),
    _v("cut", "cuts", "coupe coupes coupe coupons coupez coupent", "food"),
    _v("read", "reads", "lis lis lit lisons lisez lisent", "read"),
    _v("write", "writes", "écris écris écrit écrivons écrivez écrivent", "write"),
    _v("open", "opens", "ouvre ouvres ouvre ouvrons ouvrez ouvrent", "open"),
    _v("close", "closes", "ferme fermes ferme fermons fermez ferment", "open"),
    _v("wash", "washes", "lave laves lave lavons lavez lavent", "clean"),
    _v("clean", "cleans", "nettoie nettoies nettoie nettoyons nettoyez nettoient", "clean"),
    _v("carry", "carries", "porte portes porte portons portez portent", "carry"),
    _v("bring", "brings", "apporte apportes apporte apportons apportez apportent", "carry food"),
    _v("take", "takes", "prends prends prend prenons prenez prennent", "carry food read"),
)


@dataclass(frozen=True)
class Subject:
    """A sentence subject: English words, French words, French person index 0..5 (je..ils)."""

    en: str
    fr: str
    person: int

    @property
    def third_singular(self) -> bool:
        return self.person == 2


_PRONOUNS = (Subject("I", "je", 0), Subject("you", "vous", 4), Subject("he", "il", 2), Subject("she", "elle", 2),
             Subject("we", "nous", 3), Subject("they", "ils", 5))
_NAMES = ("Paul", "Marie", "Thomas", "Julie", "Anna", "Louis", "Emma", "Lucas", "Sophie", "Jules", "Clara", "Victor")
_NOUN_SUBJECTS = (
    Subject("my brother", "mon frère", 2), Subject("my sister", "ma sœur", 2), Subject("the teacher", "le professeur", 2),
    Subject("the doctor", "le médecin", 2), Subject("our neighbour", "notre voisin", 2),
    Subject("the children", "les enfants", 5), Subject("my parents", "mes parents", 5),
    Subject("the little girl", "la petite fille", 2), Subject("my friend", "mon ami", 2),
    Subject("the students", "les étudiants", 5), Subject("the driver", "le chauffeur", 2),
    Subject("his mother", "sa mère", 2), Subject("her father", "son père", 2), Subject("the baker", "le boulanger", 2),
    Subject("the waiter", "le serveur", 2), Subject("my grandmother", "ma grand-mère", 2),
)

_PLACES = (
    ("in the kitchen", "dans la cuisine"), ("in the garden", "dans le jardin"), ("at the station", "à la gare"),
    ("at school", "à l'école"), ("at home", "à la maison"), ("in the car", "dans la voiture"),
    ("in the shop", "dans le magasin"), ("at the market", "au marché"), ("at the office", "au bureau"),
    ("in the park", "au parc"), ("at the hotel", "à l'hôtel"), ("in the street", "dans la rue"),
    ("in town", "en ville"), ("on the table", "sur la table"), ("under the bed", "sous le lit"),
    ("near the door", "près de la porte"), ("in the living room", "dans le salon"),
)
_TIMES = (
    ("today", "aujourd'hui"), ("every morning", "tous les matins"), ("every day", "tous les jours"),
    ("on Monday", "lundi"), ("on Friday", "vendredi"), ("tonight", "ce soir"), ("now", "maintenant"),
    ("in the evening", "le soir"), ("after lunch", "après le déjeuner"), ("before dinner", "avant le dîner"),
    ("every week", "chaque semaine"), ("on Sunday", "dimanche"),
)


# --------------------------------------------------------------------------------------------------------------
# Small French/English morphology helpers
# --------------------------------------------------------------------------------------------------------------
def _fr_starts_with_vowel(word: str) -> bool:
    return word.lower().startswith(_FR_VOWELS)


def _fr_elide(short: str, next_word: str) -> str:
    """Join a clitic (``le``, ``la``, ``je``, ``ne``, ``de``, ``que``) to the next word with elision if needed."""
    if _fr_starts_with_vowel(next_word):
        return short[:-1] + "'" + next_word
    return short + " " + next_word


def _en_indefinite(next_word: str) -> str:
    return "an" if next_word.lower().startswith(_EN_VOWELS) else "a"


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


@dataclass(frozen=True)
class _NounPhrase:
    en: str
    fr: str
    gender: str
    plural: bool


_DETERMINERS = ("the", "a", "my", "your", "our", "this", "these", "number")


def _noun_phrase(rng: random.Random, noun: Noun, determiner: str, negated: bool = False) -> _NounPhrase:
    """Build an aligned EN/FR object noun phrase with an optional adjective."""
    plural = determiner in ("these", "number") or (determiner in ("the", "my", "your", "our") and rng.random() < 0.3)
    adjectives = [a for a in ADJECTIVES if a.attributive and a.fits(noun)]
    adj = rng.choice(adjectives) if adjectives and rng.random() < 0.5 else None
    en_noun = noun.en_pl if plural else noun.en
    fr_noun = noun.fr_pl if plural else noun.fr
    en_core = f"{adj.en} {en_noun}" if adj else en_noun
    if adj is None:
        fr_core = fr_noun
    elif adj.before:
        fr_core = f"{adj.fr(noun.gender, plural)} {fr_noun}"
    else:
        fr_core = f"{fr_noun} {adj.fr(noun.gender, plural)}"
    fem = noun.gender == "f"
    vowel = _fr_starts_with_vowel(fr_core)
    if determiner == "the":
        en = f"the {en_core}"
        fr = f"les {fr_core}" if plural else _fr_elide("la" if fem else "le", fr_core)
    elif determiner == "a":
        en = f"{_en_indefinite(en_core)} {en_core}"
        fr = _fr_elide("de", fr_core) if negated else f"{'une' if fem else 'un'} {fr_core}"
    elif determiner == "my":
        en = f"my {en_core}"
        fr = f"mes {fr_core}" if plural else f"{'ma' if fem and not vowel else 'mon'} {fr_core}"
    elif determiner == "your":
        en, fr = f"your {en_core}", f"{'vos' if plural else 'votre'} {fr_core}"
    elif determiner == "our":
        en, fr = f"our {en_core}", f"{'nos' if plural else 'notre'} {fr_core}"
    elif determiner == "this":
        en = f"this {en_core}"
        fr = f"{'cette' if fem else ('cet' if vowel else 'ce')} {fr_core}"
    elif determiner == "these":
        en, fr = f"these {en_core}", f"ces {fr_core}"
    elif determiner == "number":
        count = rng.randint(2, 12)
        en, fr = f"{_ONES[count]} {en_core}", f"{french_number(count)} {fr_core}"
    else:
        raise ValueError(f"unknown determiner {determiner!r}; expected one of {_DETERMINERS}")
    return _NounPhrase(en, fr, noun.gender, plural)


def _subject(rng: random.Random) -> Subject:
    kind = rng.random()
    if kind < 0.45:
        return rng.choice(_PRONOUNS)
    if kind < 0.7:
        name = rng.choice(_NAMES)
        return Subject(name, name, 2)
    return rng.choice(_NOUN_SUBJECTS)


def _fr_subject_verb(subject: Subject, verb_form: str, negated: bool) -> str:
    """French subject + (ne) verb (pas), with elision of ``je`` and ``ne``."""
    if negated:
        return f"{subject.fr} {_fr_elide('ne', verb_form)} pas"
    if subject.fr == "je":
        return _fr_elide("je", verb_form)
    return f"{subject.fr} {verb_form}"


def _adverbial(rng: random.Random) -> tuple[str, str] | None:
    roll = rng.random()
    if roll < 0.3:
        return rng.choice(_PLACES)
    if roll < 0.6:
        return rng.choice(_TIMES)
    return None


# --------------------------------------------------------------------------------------------------------------
# Parallel templates
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SentencePair:
    """One English sentence and its French translation."""

    en: str
    fr: str


def _pick_verb_object(rng: random.Random) -> tuple[Verb, Noun]:
    verb = rng.choice(VERBS)
    nouns = [n for n in NOUNS if n.tags & verb.objects]
    return verb, rng.choice(nouns)


def _clause(rng: random.Random, mode: str) -> SentencePair:
    """Subject-verb-object clause: ``mode`` in {"statement", "negation", "question"}."""
    subject = _subject(rng)
    while mode == "question" and subject.person == 0:  # "Do I like ...?" is unnatural
        subject = _subject(rng)
    verb, noun = _pick_verb_object(rng)
    negated = mode == "negation"
    determiners = ("the", "a", "my", "this") if negated else _DETERMINERS
    obj = _noun_phrase(rng, noun, rng.choice(determiners), negated=negated)
    adverb = _adverbial(rng)
    en_tail = f" {adverb[0]}" if adverb else ""
    fr_tail = f" {adverb[1]}" if adverb else ""
    fr_verb = verb.fr[subject.person]
    if mode == "question":
        aux = "Does" if subject.third_singular else "Do"
        en = f"{aux} {subject.en} {verb.en} {obj.en}{en_tail}?"
        fr = _fr_elide("Est-ce que", _fr_subject_verb(subject, fr_verb, False)) + f" {obj.fr}{fr_tail} ?"
        return SentencePair(en, fr)
    if negated:
        aux = "does not" if subject.third_singular else "do not"
        en = f"{subject.en} {aux} {verb.en} {obj.en}{en_tail}."
    else:
        en = f"{subject.en} {verb.en_3sg if subject.third_singular else verb.en} {obj.en}{en_tail}."
    fr = f"{_fr_subject_verb(subject, fr_verb, negated)} {obj.fr}{fr_tail}."
    return SentencePair(_capitalize(en), _capitalize(fr))


def _predicate_adjective(rng: random.Random) -> SentencePair:
    """"The red car is dirty." / "La voiture rouge est sale." """
    noun = rng.choice([n for n in NOUNS if "phys" in n.tags])
    predicates = [a for a in ADJECTIVES if a.fits(noun)]
    pred = rng.choice(predicates)
    obj = _noun_phrase(rng, noun, rng.choice(("the", "my", "your", "our", "this", "these")))
    if pred.en in obj.en.split():  # avoid "the red car is red"
        return _predicate_adjective(rng)
    en = f"{obj.en} {'are' if obj.plural else 'is'} {pred.en}."
    fr = f"{obj.fr} {'sont' if obj.plural else 'est'} {pred.fr(obj.gender, obj.plural)}."
    return SentencePair(_capitalize(en), _capitalize(fr))


def _location(rng: random.Random) -> SentencePair:
    """"There are three apples in the kitchen." / "The keys are on the table." """
    noun = rng.choice(NOUNS)
    place_en, place_fr = rng.choice(_PLACES)
    if rng.random() < 0.5:
        obj = _noun_phrase(rng, noun, rng.choice(("a", "number")))
        en = f"there {'are' if obj.plural else 'is'} {obj.en} {place_en}."
        fr = f"il y a {obj.fr} {place_fr}."
    else:
        obj = _noun_phrase(rng, noun, rng.choice(("the", "my", "your", "our", "this", "these")))
        en = f"{obj.en} {'are' if obj.plural else 'is'} {place_en}."
        fr = f"{obj.fr} {'sont' if obj.plural else 'est'} {place_fr}."
    return SentencePair(_capitalize(en), _capitalize(fr))


def _imperative(rng: random.Random) -> SentencePair:
    """"Please open the window." / "Ouvrez la fenêtre, s'il vous plaît." """
    verb = rng.choice([v for v in VERBS if v.imperative])
    noun = rng.choice([n for n in NOUNS if n.tags & verb.objects])
    obj = _noun_phrase(rng, noun, rng.choice(("the", "a", "my", "this", "these", "number")))
    adverb = _adverbial(rng)
    en_tail = f" {adverb[0]}" if adverb else ""
    fr_tail = f" {adverb[1]}" if adverb else ""
    en = f"please {verb.en} {obj.en}{en_tail}."
    fr = f"{verb.fr[4]} {obj.fr}{fr_tail}, s'il vous plaît."
    return SentencePair(_capitalize(en), _capitalize(fr))


_PARALLEL_TEMPLATES: tuple[tuple[float, Callable[[random.Random], SentencePair]], ...] = (
    (0.40, lambda r: _clause(r, "statement")),
    (0.15, lambda r: _clause(r, "negation")),
    (0.12, lambda r: _clause(r, "question")),
    (0.13, _predicate_adjective),
    (0.12, _location),
    (0.08, _imperative),
)


def word_count(text: str) -> int:
    """Number of whitespace-separated words, punctuation-only tokens excluded."""
    return sum(1 for token in text.split() if any(ch.isalnum() for ch in token))


def _draw(rng: random.Random, make: Callable[[random.Random], SentencePair | str]) -> SentencePair | str:
    for _ in range(100):
        item = make(rng)
        en = item.en if isinstance(item, SentencePair) else item
        if MIN_WORDS <= word_count(en) <= MAX_WORDS:
            return item
    raise RuntimeError(f"template {make!r} failed to produce {MIN_WORDS}-{MAX_WORDS} words in 100 tries")


def _weighted(rng: random.Random, table: tuple[tuple[float, Callable], ...]) -> Callable:
    weights = [w for w, _ in table]
    return rng.choices([f for _, f in table], weights=weights, k=1)[0]


def parallel_pair(rng: random.Random) -> SentencePair:
    """Draw one aligned English/French pair (4–14 English words)."""
    pair = _draw(rng, lambda r: _weighted(r, _PARALLEL_TEMPLATES)(r))
    assert isinstance(pair, SentencePair)
    return pair


# --------------------------------------------------------------------------------------------------------------
# English-only templates (wider vocabulary, spelled-out numbers and digit strings)
# --------------------------------------------------------------------------------------------------------------
_EVENTS = ("train", "bus", "meeting", "class", "film", "concert", "lesson", "game", "flight", "party")
_RELATIVES = ("brother", "sister", "mother", "father", "uncle", "aunt", "cousin", "grandfather", "neighbour", "boss")
_WEATHER = ("cold", "warm", "sunny", "windy", "cloudy", "very hot", "quite dark", "wet")
_CITIES = ("London", "Paris", "Berlin", "Madrid", "Rome", "Boston", "Dublin", "Oslo", "Vienna", "Lisbon")
_CODES = ("phone number", "room number", "order number", "door code", "account number", "ticket number")
_ACTIVITIES = ("play football", "go swimming", "cook dinner", "walk the dog", "visit my aunt", "work late",
               "study for the exam", "clean the house", "go to the cinema", "watch the news", "read a novel")
_FEELINGS = ("happy", "tired", "hungry", "busy", "late", "ready", "sorry", "sure", "glad", "worried")
_PLURAL_NEEDS = ("chairs", "plates", "cups", "tickets", "candles", "bottles of water", "pencils", "sandwiches")


def _clock_time(rng: random.Random) -> str:
    hour = rng.randint(1, 12)
    minute = rng.choice((0, 5, 10, 15, 20, 30, 40, 45, 50))
    if minute == 0:
        return f"{number_to_words(hour)} o'clock"
    if minute < 10:
        return f"{number_to_words(hour)} oh {number_to_words(minute)}"
    return f"{number_to_words(hour)} {number_to_words(minute)}"


def _digit_string(rng: random.Random, length: int) -> str:
    return digits_to_words("".join(str(rng.randint(0, 9)) for _ in range(length)))


_ENGLISH_TEMPLATES: tuple[tuple[float, Callable[[random.Random], str]], ...] = (
    (0.10, lambda r: f"The {r.choice(_EVENTS)} {r.choice(('starts', 'leaves', 'ends'))} at {_clock_time(r)}."),
    (0.07, lambda r: f"My {r.choice(_CODES)} is {_digit_string(r, r.randint(3, 7))}."),
    (0.05, lambda r: f"Please call me back at {_digit_string(r, r.randint(5, 8))}."),
    (0.07, lambda r: f"My {r.choice(_RELATIVES)} is {number_to_words(r.randint(18, 99))} years old."),
    (0.06, lambda r: f"It is {r.choice(_WEATHER)} in {r.choice(_CITIES)} {r.choice(_TIMES)[0]}."),
    (0.07, lambda r: f"We need {number_to_words(r.randint(2, 99))} {r.choice(_PLURAL_NEEDS)} for the "
                     f"{r.choice(('party', 'meeting', 'class', 'wedding', 'picnic'))}."),
    (0.06, lambda r: f"{r.choice(_NAMES)} wants to {r.choice(_ACTIVITIES)} {r.choice(_TIMES)[0]}."),
    (0.06, lambda r: f"I am {r.choice(_FEELINGS)} because I have to {r.choice(_ACTIVITIES)}."),
    (0.05, lambda r: f"The trip to {r.choice(_CITIES)} takes {number_to_words(r.randint(2, 12))} hours by "
                     f"{r.choice(('train', 'car', 'bus', 'plane', 'boat'))}."),
    (0.05, lambda r: f"It costs {number_to_words(r.randint(2, 999))} "
                     f"{r.choice(('dollars', 'euros', 'pounds'))}."),
)


def english_sentence(rng: random.Random) -> str:
    """Draw one English sentence: 60 % from the parallel grammar, 40 % from English-only templates."""
    if rng.random() < 0.6:
        return parallel_pair(rng).en
    sentence = _draw(rng, lambda r: _weighted(r, _ENGLISH_TEMPLATES)(r))
    assert isinstance(sentence, str)
    return sentence


# --------------------------------------------------------------------------------------------------------------
# Unique lists
# --------------------------------------------------------------------------------------------------------------
def _unique(n: int, seed: int, draw: Callable[[random.Random], object], key: Callable[[object], str],
            exclude: Iterable[str], what: str) -> list:
    if n < 0:
        raise ValueError(f"{what}: n must be >= 0, got {n}")
    rng = random.Random(seed)
    seen = set(exclude)
    items: list = []
    budget = 50 * n + 1000
    while len(items) < n:
        budget -= 1
        if budget < 0:
            raise RuntimeError(f"{what}: only {len(items)} unique items after many draws (asked {n}, seed {seed})")
        item = draw(rng)
        if key(item) not in seen:
            seen.add(key(item))
            items.append(item)
    return items


def unique_sentences(n: int, seed: int = 0, exclude: Iterable[str] = ()) -> list[str]:
    """``n`` distinct English sentences (none in ``exclude``), reproducible from ``seed``."""
    return _unique(n, seed, english_sentence, lambda s: s, exclude, "unique_sentences")  # type: ignore[arg-type]


def unique_pairs(n: int, seed: int = 0, exclude: Iterable[str] = ()) -> list[SentencePair]:
    """``n`` EN→FR pairs with distinct English sides (none in ``exclude``), reproducible from ``seed``."""
    return _unique(n, seed, parallel_pair, lambda p: p.en, exclude, "unique_pairs")  # type: ignore[arg-type]
