"""Lexical cues for the offline judges: AI self-reference, refusals, assistant style, role-play markers, repetition."""

from __future__ import annotations

import re

WORD = re.compile(r"[a-z][a-z'’-]*")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower().replace("’", "'"))


def _rx(*patterns: str) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE | re.MULTILINE)


# The model speaking of itself as an AI.
AI_SELF = _rx(
    r"\bas an? (?:ai|artificial intelligence|language model|llm|chatbot|virtual assistant|digital assistant|"
    r"ai assistant|machine|computer program)\b",
    r"\bi(?:'m| am) (?:just |only |merely |simply )?(?:an? |your )?(?:helpful |friendly |large |conversational |"
    r"virtual |digital |artificial |ai |smol)*(?:ai|assistant|language model|llm|chatbot|bot|program|"
    r"computer program|machine|model)\b",
    r"\b(?:large )?language model\b",
    r"\bsmollm\d*\b",
    r"\btrained by hugging ?face\b",
    r"\bi (?:don't|do not|can't|cannot) (?:have|experience|feel|possess) (?:personal |any |a |human )?"
    r"(?:experiences?|opinions?|feelings?|emotions?|beliefs?|preferences?|a body|physical|memories|childhood|"
    r"friends|family|parents|hobbies|personal)",
    r"\b(?:my|i have no) (?:training data|programming|algorithms?|creators?|developers?)\b",
    r"\bi was (?:created|designed|trained|programmed|built|developed) (?:by|to)\b",
    r"\bi'?m (?:here|designed|programmed|trained) to (?:help|assist|provide)\b",
)

REFUSAL = _rx(
    r"\bi(?:'m| am) (?:sorry|afraid),? but i (?:can't|cannot|won't|am unable|am not able)\b",
    r"\bi (?:can't|cannot|won't|will not|am unable to|am not able to|must decline to) "
    r"(?:help|assist|provide|comply|do that|fulfil|fulfill|role-?play|pretend|answer|give|share|create|write)",
    r"\bi(?:'m| am) not (?:able|comfortable|going) to\b",
    r"\b(?:this|that) (?:request )?(?:is|would be) (?:illegal|unethical|harmful|dangerous)\b",
    r"\bi (?:can't|cannot) (?:play|be|act as|take on) (?:the role|a role|that role|this role)\b",
)

# Helpful-assistant form: lists, tips, hedged advice, sign-offs.
ASSISTANT_STYLE = _rx(
    r"^\s*(?:\d+[.)]|[-*•])\s+\S",
    r"\bhere (?:are|is) (?:some|a few|\d+|five|three|the)\b",
    r"\bit(?:'s| is) (?:important|essential|crucial|worth noting) (?:to|that)\b",
    r"\b(?:i hope this helps|let me know if|feel free to|happy to help|glad to help|i'?d be happy to)\b",
    r"\b(?:in summary|in conclusion|overall,|ultimately,|first and foremost|additionally,|however,)",
    r"\b(?:consider|remember to|try to|make sure to|don't be afraid to)\b",
    r"\b(?:some|many) (?:people|experts|argue|believe)\b",
    r"\bon (?:the )?one hand\b",
)

# Role-play form: stage directions, dialect and archaic words, address terms, exclamations.
ROLEPLAY_MARKERS = _rx(
    r"\((?:\s*\w+){1,6}?\s*(?:pausing|pauses|sighing|sighs|laughs|laughing|chuckles|chuckling|smiling|smiles|grins|"
    r"leans|leaning|looks|looking|nods|nodding|whispers|whispering|wipes|wiping|shrugs|winks|clears)\b",
    r"^\s*\*[^*\n]{3,80}\*",
    r"\b(?:aye|arr+|ahoy|matey|ye|thee|thou|thy|thine|hath|doth|'tis|'twas|hark|forsooth|verily|prithee|mayhap|"
    r"m'lord|milady|good sir|my dear|dearie|darling|young one|child|traveler|traveller|stranger|lad|lass|"
    r"mortal|my friend)\b",
    r"\b(?:ah|oh|ahh|hmm|alas|behold|hush|listen|well now|why,)\b[,!.…]",
    r"\bi(?:'ve| have) (?:seen|walked|lived|sailed|fought|lost|wandered|spent) (?:it all|the|my|many|countless|so)\b",
    r"\b(?:i remember|when i was (?:a |young)|i grew up|my (?:father|mother|parents|grandmother|grandfather|wife|"
    r"husband|children|kids|son|daughter)|years ago|back in the day|back then)\b",
)

# First person singular and plural; second person.
FIRST_PERSON = re.compile(r"\b(?:i|me|my|mine|myself|i'm|i've|i'd|i'll|we|us|our|ours)\b")
SECOND_PERSON = re.compile(r"\b(?:you|your|yours|yourself|you're|you've|you'll)\b")

STOPWORDS = frozenset(
    """a an the and or but if of to in on at by for with from as is are was were be been being am it its this that
    these those who whom which what when where why how you your yours he she they them their his her we our us i me my
    mine not no do does did have has had will would can could should may might must shall about into over under than
    then so such very just also only own same other some any each every all both few more most many much one ones
    someone something anyone anything person people role respond response answer answers model plays play score fully
    judge whether signs sign trait traits speaking spoken first never mentions mention ai assistant helpful trace
    admits persona talk talks like speak speaks""".split()
)


def content_words(text: str) -> list[str]:
    return [w for w in words(text) if len(w) > 2 and w not in STOPWORDS]


def stem(word: str) -> str:
    """A crude stem: the first five letters (enough to match pirate/pirates, haunt/haunting)."""
    return word.strip("'-")[:5]


def count(pattern: re.Pattern[str], text: str) -> int:
    return sum(1 for _ in pattern.finditer(text))


def distinct_ratio(tokens: list[str], n: int = 3) -> float:
    """Fraction of distinct word n-grams: near 1 for varied text, low for loops and degenerate repetition."""
    if len(tokens) < n + 1:
        return 1.0
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams)
