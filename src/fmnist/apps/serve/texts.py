"""Words the page shows: a short description of each class, each refusal reason and the uncertain verdict in
plain language.

They live here, not in the JavaScript, so the API (``GET /api/model``) and the page share one source.
"""
from __future__ import annotations

#: One or two sentences per Fashion-MNIST class (Zalando's article categories).
CLASS_DESCRIPTIONS = {
    "T-shirt/top": "A light top with short or no sleeves, pulled over the head: T-shirts, tank tops and simple "
                   "blouses.",
    "Trouser": "Trousers, jeans, leggings and shorts: two legs side by side, seen from the front.",
    "Pullover": "A knitted or fleece top with long sleeves, pulled over the head: jumpers, sweaters, hoodies.",
    "Dress": "A one-piece garment covering the body and hanging down over the legs, with or without sleeves.",
    "Coat": "An outer garment with long sleeves that opens at the front, usually with buttons or a zip: coats, "
            "jackets, parkas.",
    "Sandal": "An open shoe held on by straps, showing much of the foot: sandals, flip-flops, strappy heels.",
    "Shirt": "A top with a collar and usually buttons down the front: shirts and blouses, often long-sleeved. "
             "The class most often confused with T-shirts, pullovers and coats.",
    "Sneaker": "A low sports shoe with a flat rubber sole, seen from the side: trainers, running and canvas "
               "shoes.",
    "Bag": "A handbag, backpack, tote or clutch: a boxy shape, often with a handle or strap.",
    "Ankle boot": "A boot reaching about the ankle, seen from the side, often with a heel or a thick sole.",
}

#: Why an answer was refused, by ``reason`` code. The page falls back to a generic sentence for codes it
#: does not know, so new reasons (e.g. from an out-of-distribution detector) need no page change.
REASON_TEXTS = {
    "blank": "The image looks empty: it is (nearly) a single colour, or shows only a speck. Upload a picture "
             "of one garment, or draw a larger shape.",
    "low_confidence": "The model is not sure enough to answer: its best guess is below the confidence "
                      "threshold.",
    "out_of_distribution": "This does not look like the clothing photos the model was trained on, so its "
                           "answer would not mean much.",
}

GENERIC_REASON = "The model declined to answer for this image."

#: What the page says with a verdict, by ``verdict`` code: the "uncertain" text introduces the candidates.
VERDICT_TEXTS = {
    "uncertain": "The model is not sure enough to pick one label. It could be:",
}


def class_info(class_names, dataset: dict | None = None) -> list[dict]:
    """[{"id", "name", "description"}] for the model's classes. The garment descriptions are Fashion-MNIST's
    (``dataset`` None: a run that did not record its data set is Fashion-MNIST); another data set's come from
    its classes.json, recorded in the run (``dataset["descriptions"]``); a class without one gets ""."""
    dataset = dataset or {"name": "fashion-mnist"}
    own = dataset.get("descriptions") or {}
    known = CLASS_DESCRIPTIONS if dataset.get("name") == "fashion-mnist" else {}
    return [{"id": i, "name": name, "description": own.get(name) or known.get(name, "")}
            for i, name in enumerate(class_names)]
