"""Zero-shot heads for a sentence-embedding backbone: the text analogue of CLIP's frozen zero-shot heads.

CLIP's zero-shot head of a dataset (task arithmetic's official code, ``src/heads.py``): every class name is put
into each of the dataset's prompt templates, each prompt embedded by the text encoder and L2-normalised, the
embeddings averaged per class and normalised again, times the logit scale; the head normalises its input
(``ClassificationHead(normalize=True)``), so a logit is scale x cosine(image embedding, class embedding), no bias.

Here the backbone embeds sentences, so the same encoder embeds both the class prompts and the inputs: a task's
head is built from theta_0 once and stays frozen (the same for every fine-tune, task vector and merge). The
temperature is fixed at 20, the scale MiniLM (all-MiniLM-L6-v2) was trained with (sentence-transformers'
MultipleNegativesRankingLoss), as CLIP's 100 is the scale CLIP was trained with; it moves the loss, never the
zero-shot argmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ZERO_SHOT_TEMPERATURE = 20.0

# per task: the prompt templates (CLIP's per-dataset templates) and one plain-words name per class, in the
# order of the task's ClassLabel names (checked against them by class_prompts)
TEMPLATES = {
    "rt_sentiment": ("a {} movie review.", "the critic found this film {}.", "this review of the movie is {}."),
    "tweet_sentiment": ("a {} tweet.", "the tone of this tweet is {}.", "this post expresses a {} opinion."),
    "subjectivity": ("a {} sentence.", "this sentence is {}.", "a sentence from a {}."),
    "sms_spam": ("a text message that is {}.", "this sms is {}.", "{}."),
    "wordnet_noun": ("a word for a kind of {}.", "the definition of a noun about {}.", "{}."),
    "wordnet_verb": ("a verb about {}.", "the definition of a verb of {}.", "{}."),
    "ng20": ("a newsgroup post about {}.", "a discussion forum message on {}.", "{}."),
}
CLASS_WORDS = {
    "rt_sentiment": {"rotten": "negative and bad", "fresh": "positive and good"},
    "tweet_sentiment": {"negative": "negative", "neutral": "neutral", "positive": "positive"},
    "subjectivity": {"objective": "objective plot summary stating facts",
                     "subjective": "subjective review giving an opinion"},
    "sms_spam": {"ham": "a normal personal conversation", "spam": "spam advertising a prize or offer"},
    "wordnet_noun": {
        "noun.Tops": "a top-level abstract entity", "noun.act": "an act or action", "noun.animal": "an animal",
        "noun.artifact": "a man-made object or artifact", "noun.attribute": "an attribute or property",
        "noun.body": "a part of the body", "noun.cognition": "knowledge, thought or cognition",
        "noun.communication": "communication, language or writing", "noun.event": "an event or happening",
        "noun.feeling": "a feeling or emotion", "noun.food": "food or drink", "noun.group": "a group or collection",
        "noun.location": "a place or location", "noun.motive": "a motive or goal", "noun.object": "a natural object",
        "noun.person": "a person", "noun.phenomenon": "a natural phenomenon", "noun.plant": "a plant",
        "noun.possession": "possession, money or property", "noun.process": "a natural process",
        "noun.quantity": "a quantity or unit of measure", "noun.relation": "a relation between things",
        "noun.shape": "a shape", "noun.state": "a state or condition", "noun.substance": "a substance or material",
        "noun.time": "time or a period of time"},
    "wordnet_verb": {
        "verb.body": "bodily functions and grooming", "verb.change": "change", "verb.cognition": "thinking",
        "verb.communication": "speaking and communicating", "verb.competition": "competing and fighting",
        "verb.consumption": "eating and drinking", "verb.contact": "touching and hitting",
        "verb.creation": "making and creating", "verb.emotion": "feeling emotions", "verb.motion": "moving",
        "verb.perception": "seeing, hearing and perceiving", "verb.possession": "owning, buying and giving",
        "verb.social": "social interaction", "verb.stative": "being or having a state", "verb.weather": "weather"},
    "ng20": {
        "alt.atheism": "atheism", "comp.graphics": "computer graphics",
        "comp.os.ms-windows.misc": "microsoft windows", "comp.sys.ibm.pc.hardware": "ibm pc hardware",
        "comp.sys.mac.hardware": "apple mac hardware", "comp.windows.x": "the x window system",
        "misc.forsale": "items for sale", "rec.autos": "cars", "rec.motorcycles": "motorcycles",
        "rec.sport.baseball": "baseball", "rec.sport.hockey": "hockey", "sci.crypt": "cryptography",
        "sci.electronics": "electronics", "sci.med": "medicine", "sci.space": "space",
        "soc.religion.christian": "christianity", "talk.politics.guns": "guns", "talk.politics.mideast":
        "the middle east", "talk.politics.misc": "politics", "talk.religion.misc": "religion"},
}


def zero_shot_tasks() -> list[str]:
    """The tasks with prompts (a zero-shot head needs its classes in words)."""
    return sorted(TEMPLATES)


def class_prompts(task: str, class_names: list[str]) -> list[list[str]]:
    """Per class (in `class_names` order, the task's ClassLabel names): every template filled with its words."""
    if task not in TEMPLATES:
        raise KeyError(f"no zero-shot prompts for task {task!r}; tasks with prompts: {zero_shot_tasks()}")
    words = CLASS_WORDS[task]
    missing = [c for c in class_names if c not in words]
    if missing:
        raise KeyError(f"task {task!r}: no words for classes {missing}")
    return [[t.format(words[c]) for t in TEMPLATES[task]] for c in class_names]


class CosineHead(nn.Linear):
    """A linear head over the L2-normalised pooled feature (CLIP's ``ClassificationHead(normalize=True)``): with
    unit-norm rows times a temperature as its weight and zero bias, a logit is temperature x cosine."""

    def forward(self, x):
        return F.linear(F.normalize(x, dim=-1), self.weight, self.bias)


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], max_length: int = 64) -> torch.Tensor:
    """Unit-norm pooled embeddings of `texts` by `model`'s encoder as it is now (theta_0 when called at start:
    LoRA's B is zero there), one row per text."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    dev = next(model.parameters()).device
    ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
    was = model.training
    model.eval()
    pooled = model.pool(model.prefix_hidden(ids, mask, model.num_layers), mask)
    model.train(was)
    return F.normalize(pooled.float(), dim=-1).cpu()


def class_embeddings(model, tokenizer, prompts: list[list[str]]) -> torch.Tensor:
    """Per class: the mean of its prompts' unit embeddings, normalised again (the official code's recipe)."""
    rows = [F.normalize(embed_texts(model, tokenizer, p).mean(0), dim=0) for p in prompts]
    return torch.stack(rows)


def install_zero_shot_heads(model, tokenizer, prompts_per_task: list[list[list[str]]],
                            temperature: float = ZERO_SHOT_TEMPERATURE) -> None:
    """Replace `model.classifier` by a :class:`CosineHead` whose rows are every task's class embeddings (tasks in
    order, as the joint head's rows) times `temperature`, bias zero. The state keys stay ``classifier.weight`` /
    ``classifier.bias`` and requires_grad stays the old head's (in the trainable state with full fine-tuning, as
    the probe heads are): the strategy, not this flag, keeps it frozen (it never trains or sends it)."""
    W = torch.cat([class_embeddings(model, tokenizer, p) for p in prompts_per_task]) * float(temperature)
    old = model.classifier
    if W.shape != old.weight.shape:
        raise ValueError(f"zero-shot head of shape {tuple(W.shape)} for a classifier of {tuple(old.weight.shape)}")
    head = CosineHead(old.in_features, old.out_features).to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(W.to(head.weight))
        head.bias.zero_()
    head.requires_grad_(old.weight.requires_grad)
    model.classifier = head
