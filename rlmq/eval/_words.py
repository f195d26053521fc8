"""Word lists the generators draw from. Plain data; nothing here knows a task."""

from __future__ import annotations

__all__: list[str] = []

# ---------------------------------------------------------------- sniah

STARS = (
    "Orion", "Lyra", "Vega", "Draco", "Altair", "Rigel", "Sirius", "Carina", "Perseus", "Auriga",
    "Cygnus", "Hydra", "Lupus", "Pavo", "Corvus", "Tucana", "Volans", "Fornax", "Pictor", "Norma",
)  # fmt: skip
SITES = (
    "vault", "archive", "depot", "observatory", "hangar",
    "greenhouse", "reactor", "library", "cellar", "workshop",
)  # fmt: skip
COLOURS = (
    "amber", "cobalt", "crimson", "ivory", "jade", "ochre", "scarlet", "silver", "teal", "violet",
    "copper", "indigo", "olive", "saffron", "slate", "umber",
)  # fmt: skip
ANIMALS = (
    "falcon", "otter", "heron", "lynx", "marten", "osprey", "badger", "ibex", "condor", "gecko",
    "walrus", "pelican", "jackal", "bison", "kestrel", "tapir",
)  # fmt: skip
STAFF = ("Mara", "Jonas", "Priya", "Tomasz", "Ines", "Kofi", "Ada", "Lucien", "Yuki", "Soren")

# ---------------------------------------------------------------- oolong

COUNTRIES = (
    "Peru", "Norway", "Kenya", "Portugal", "Nepal", "Chile", "Iceland", "Morocco", "Vietnam", "Canada",
    "Ghana", "Finland", "Mongolia", "Uruguay", "Jordan", "Laos", "Estonia", "Bolivia", "Croatia", "Malta",
)  # fmt: skip
CITIES = (
    "Lisbon", "Osaka", "Denver", "Krakow", "Nairobi", "Austin", "Perth", "Bergen", "Cusco", "Tbilisi",
    "Porto", "Leeds", "Quito", "Hanoi", "Dakar", "Tampere", "Cork", "Graz", "Split", "Adelaide",
)  # fmt: skip
INVENTIONS = (
    "the telescope", "the bicycle", "the printing press", "penicillin", "the steam engine", "the zipper",
    "the barcode", "the microwave oven", "the ballpoint pen", "the compass", "the tin can",
    "the thermometer", "the parachute", "the typewriter", "the lightbulb", "the stethoscope",
)  # fmt: skip
EVENTS = (
    "the first Winter Olympics", "the signing of the Magna Carta", "the Battle of Hastings",
    "the first World Cup final", "the Congress of Vienna", "the Boston Tea Party",
    "the first transatlantic flight", "the Treaty of Tordesillas",
)  # fmt: skip
ACRONYMS = (
    ("NATO", "the North Atlantic Treaty Organization"),
    ("UNESCO", "the United Nations Educational, Scientific and Cultural Organization"),
    ("NASA", "the National Aeronautics and Space Administration"),
    ("OPEC", "the Organization of the Petroleum Exporting Countries"),
    ("FIFA", "the International Federation of Association Football"),
    ("WHO", "the World Health Organization"),
    ("DNA", "deoxyribonucleic acid"),
    ("HTML", "HyperText Markup Language"),
    ("GDP", "gross domestic product"),
    ("CPU", "a central processing unit"),
    ("ISBN", "the International Standard Book Number"),
    ("RSVP", "répondez s'il vous plaît"),
    ("ASAP", "as soon as possible"),
    ("PIN", "a personal identification number"),
    ("SCUBA", "a self-contained underwater breathing apparatus"),
    ("LASER", "light amplification by stimulated emission of radiation"),
)
FOUNDED = (
    "the Red Cross", "the Boy Scouts", "the Nobel Foundation", "Wikipedia", "the Royal Society",
    "the Salvation Army", "the modern Olympic movement", "the first public library in Boston",
)  # fmt: skip
CONCEPTS = (
    "inflation", "erosion", "jet lag", "a solar eclipse", "a rainbow", "static electricity", "rust",
    "a tsunami", "photosynthesis", "fermentation", "a leap year", "compound interest", "a black hole",
    "the greenhouse effect",
)  # fmt: skip
OLD_THINGS = (
    "the first coins",
    "early violin strings",
    "the first footballs",
    "medieval armour",
    "the oldest maps",
)
PREFIXES = (
    "", "", "", "", "Quick question: ", "I was wondering, ", "Does anyone know: ", "Trivia night prep: ",
    "Settle a bet: ", "My kid asked me this: ",
)  # fmt: skip
