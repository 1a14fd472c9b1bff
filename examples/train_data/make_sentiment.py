"""Writes examples/sentiment_train.csv and examples/sentiment_eval.csv (deterministic).

Short English reviews from templates and word lists across many domains. Some templates appear
only in the evaluation split, so the evaluation also measures generalization to new phrasings.
Run: python examples/train_data/make_sentiment.py
"""

import csv
import random
import re
from pathlib import Path

DOMAINS = {  # thing: its aspects
    "movie": ["plot", "acting", "ending", "soundtrack", "dialogue"],
    "restaurant": ["food", "service", "dessert", "atmosphere", "wine list"],
    "hotel": ["room", "staff", "breakfast", "bed", "location"],
    "phone": ["battery", "screen", "camera", "speaker", "charger"],
    "novel": ["story", "characters", "writing", "pacing", "ending"],
    "pair of headphones": ["sound", "fit", "noise cancelling", "bass", "cable"],
    "app": ["interface", "latest update", "search", "notifications", "login"],
    "laptop": ["keyboard", "fan", "display", "trackpad", "battery life"],
    "concert": ["band", "sound mix", "setlist", "crowd", "venue"],
    "coffee shop": ["espresso", "pastries", "barista", "music", "seating"],
    "blender": ["motor", "lid", "blades", "jug", "buttons"],
    "pair of running shoes": ["cushioning", "laces", "sole", "fit", "grip"],
    "video game": ["story", "controls", "graphics", "level design", "multiplayer"],
    "airline": ["crew", "legroom", "meal", "boarding", "check-in"],
    "gym": ["equipment", "trainers", "showers", "classes", "opening hours"],
    "tablet": ["screen", "stylus", "speakers", "battery", "case"],
}
POS_ADJ = ["wonderful", "excellent", "fantastic", "superb", "delightful", "brilliant", "lovely", "outstanding",
           "impressive", "charming", "great", "amazing", "solid", "flawless", "terrific"]
NEG_ADJ = ["terrible", "awful", "disappointing", "dreadful", "mediocre", "poor", "horrible", "frustrating",
           "useless", "dull", "sloppy", "underwhelming", "annoying", "bland", "overpriced"]
# Parts that can break; the "stopped working" template only uses these.
BREAKABLE = {"phone": ["battery", "screen", "camera", "speaker", "charger"], "pair of headphones": ["cable", "noise cancelling"],
             "laptop": ["keyboard", "fan", "display", "trackpad"], "blender": ["motor", "buttons"],
             "tablet": ["screen", "stylus", "speakers"], "app": ["search", "login", "notifications"]}
POS_VERB = ["loved", "really enjoyed", "adored", "was thrilled with", "was impressed by"]
NEG_VERB = ["hated", "was let down by", "could not stand", "was annoyed by", "was unhappy with"]
TIMES = ["two days", "a week", "one use", "an hour", "a month"]
WHO = ["My sister", "My dad", "Our whole family", "My roommate", "Everyone at the table", "My best friend"]

SHARED = {
    "positive": [
        "The {thing} was {pos}.", "I {pverb} this {thing}.", "What a {pos} {thing}!",
        "The {aspect} {was} {pos} and I would happily come back.", "Honestly the best {thing} I have had in years.",
        "Five stars, the {aspect} alone {is_} worth it.", "{who} {pverb} the {thing}.",
        "Really {pos} {aspect}, I recommend this {thing} to anyone.", "Couldn't be happier with this {thing}.",
        "The {aspect} exceeded every expectation I had.", "A {pos} {thing} with {a}{pos2} {aspect}.",
        "Worth every penny, the {aspect} {is_} {pos}.",
    ],
    "negative": [
        "The {thing} was {neg}.", "I {nverb} this {thing}.", "What a {neg} {thing}.",
        "The {aspect} {was} {neg} and nobody seemed to care.", "Easily the worst {thing} I have had in years.",
        "One star, the {aspect} ruined everything.", "{who} {nverb} the {thing}.",
        "Really {neg} {aspect}, avoid this {thing}.", "I want my money back for this {thing}.",
        "The {aspect} of my {thing} stopped working after {time}.", "A {neg} {thing} with {a}{neg2} {aspect}.",
        "Not worth the money, the {aspect} {is_} {neg}.",
    ],
}
EVAL_ONLY = {  # phrasings the model never sees in training
    "positive": ["I was pleasantly surprised: the {aspect} {is_} {pos}.", "Would gladly pay for this {thing} again.",
                 "Not {neg} at all, the {aspect} {is_} actually {pos}."],
    "negative": ["I was sorely disappointed: the {aspect} {is_} {neg}.", "Would never pay for this {thing} again.",
                 "Not {pos} at all, the {aspect} {is_} actually {neg}."],
}


def fill(template: str, rng: random.Random) -> str:
    parts = BREAKABLE if "{time}" in template else DOMAINS
    thing = rng.choice(list(parts))
    aspect = rng.choice(parts[thing])
    plural = aspect.endswith("s") and not aspect.endswith(("ss", "us"))
    pos, pos2 = rng.sample(POS_ADJ, 2)
    neg, neg2 = rng.sample(NEG_ADJ, 2)
    text = template.format(thing=thing, aspect=aspect, pos=pos, pos2=pos2, neg=neg, neg2=neg2,
                           is_="are" if plural else "is", was="were" if plural else "was", a="" if plural else "a ",
                           pverb=rng.choice(POS_VERB), nverb=rng.choice(NEG_VERB), time=rng.choice(TIMES),
                           who=rng.choice(WHO))
    text = re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)  # "a awful" -> "an awful"
    return text[0].upper() + text[1:]


def sample(templates: dict, n_per_label: int, rng: random.Random, taken: set) -> list[tuple[str, str]]:
    rows = []
    for label, options in templates.items():
        count = 0
        while count < n_per_label:
            text = fill(rng.choice(options), rng)
            if text not in taken:
                taken.add(text)
                rows.append((text, label))
                count += 1
    rng.shuffle(rows)
    return rows


def main() -> None:
    rng, taken = random.Random(2024), set()
    train = sample(SHARED, 200, rng, taken)
    evaluation = sample(SHARED, 50, rng, taken) + sample(EVAL_ONLY, 30, rng, taken)
    rng.shuffle(evaluation)
    root = Path(__file__).resolve().parents[1]
    for name, rows in (("sentiment_train.csv", train), ("sentiment_eval.csv", evaluation)):
        with open(root / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
