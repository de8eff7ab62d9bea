"""Evaluation metrics as the benchmarks define them.

* VQA accuracy: the official VQAv2 metric (answer normalisation of the official evaluation
  script: punctuation, number words, articles, contractions; min(#matching annotators / 3, 1)
  averaged over the 10 leave-one-out subsets of annotators).
* CIDEr(-D) and BLEU-4 through ``pycocoevalcap``'s scorers, on lower-cased captions with the
  punctuation the PTB tokenizer removes stripped (no Java needed).
* ROC-AUC from the rank statistic (ties count one half), for binary tasks like HatefulMemes.
"""

from __future__ import annotations

import re

import numpy as np

# The official VQA evaluation's normalisation tables (vqaEval.py).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCTUATION = [
    ";",
    r"/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]


def _process_punctuation(text: str) -> str:
    out = text
    for mark in _PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(answer: str) -> str:
    """The official evaluation's normalisation of a predicted answer."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(answer))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQAv2 accuracy of one prediction against its (10) annotator answers: for each
    annotator, min(#other annotators giving the prediction / 3, 1), averaged."""
    if not answers:
        raise ValueError("vqa_accuracy: a question needs at least one annotator answer")
    predicted = normalize_vqa_answer(prediction)
    answers = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(answers)) > 1:
        answers = [_process_punctuation(a) for a in answers]
    scores = []
    for held_out in range(len(answers)):
        others = answers[:held_out] + answers[held_out + 1 :]
        scores.append(min(1.0, sum(a == predicted for a in others) / 3.0))
    return float(np.mean(scores))


_CAPTION_PUNCTUATION = re.compile(r"[^\w\s']|_")


def caption_tokens(text: str) -> str:
    """Lower-cased, punctuation stripped, single-spaced (what the PTB tokenizer step yields for
    plain captions)."""
    return " ".join(_CAPTION_PUNCTUATION.sub(" ", text.lower()).split())


def _tokenized(predictions: dict, references: dict, caller: str) -> tuple[dict, dict]:
    """(references, predictions) as pycocoevalcap's scorers take them, by id in sorted order:
    {id: [tokenized captions]}, {id: [tokenized prediction]}; ``caller`` names the metric in the
    error."""
    missing = set(predictions) ^ set(references)
    if missing:
        raise ValueError(f"{caller}: predictions and references differ on ids {sorted(missing)[:5]}")
    keys = sorted(predictions)
    gts = {key: [caption_tokens(r) for r in references[key]] for key in keys}
    return gts, {key: [caption_tokens(predictions[key])] for key in keys}


def caption_scores(predictions: dict, references: dict) -> dict[str, float]:
    """{'CIDEr': corpus CIDEr-D, 'BLEU-4': corpus BLEU-4} of ``predictions`` ({id: caption})
    against ``references`` ({id: [captions]}) with pycocoevalcap's scorers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts, result = _tokenized(predictions, references, "caption_scores")
    cider, _ = Cider().compute_score(gts, result)
    bleu, _ = Bleu(4).compute_score(gts, result, verbose=0)
    return {"CIDEr": float(cider), "BLEU-4": float(bleu[3])}


def cider_per_item(predictions: dict, references: dict) -> np.ndarray:
    """Each prediction's CIDEr-D (sorted by id) with the corpus's document frequencies: their
    mean is ``caption_scores``' CIDEr, their spread gives its standard error over queries."""
    from pycocoevalcap.cider.cider import Cider

    _, scores = Cider().compute_score(*_tokenized(predictions, references, "cider_per_item"))
    return np.asarray(scores, np.float64)


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties one half."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    positives, negatives = scores[labels], scores[~labels]
    if not len(positives) or not len(negatives):
        raise ValueError("roc_auc needs both positive and negative examples")
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))
