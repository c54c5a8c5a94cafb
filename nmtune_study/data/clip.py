"""Offline image-caption pairs for the contrastive (CLIP) regime.

The images are the supervised study's glyph renderings (``data.vision.render_glyphs``:
matplotlib's DejaVu fonts, random size, stroke, rotation, shear and shift): the ~100
pre-training characters plus the ten digits ``0-9`` (so that the digit tasks have a
zero-shot prompt the model has read; scikit-learn's handwritten digits, the
downstream data, are never used here). Each image gets one caption drawn from
several templates that name what is in it: the character, its case (uppercase,
lowercase, digit, symbol), the font family (DejaVu Sans / Serif / Sans Mono) and the
style (regular, bold, italic/oblique, bold italic), e.g.
``"the lowercase letter g set in bold italic DejaVu Serif"``.

A clean validation split (other augmentation seeds, same characters) is scored by
zero-shot classification with class-name prompts (:func:`class_prompts`), which
name the character only.

Example:
    >>> pairs = offline_pairs(tiny=True)
    >>> len(pairs.captions) == len(pairs.images), pairs.images.dtype
    (True, torch.uint8)
"""

from __future__ import annotations

import dataclasses
import unicodedata

import numpy as np
import torch

from nmtune_study.data import vision as vd

__all__ = ["ClipPairs", "CLIP_CHARS", "describe", "font_description", "caption", "class_prompts",
           "offline_pairs", "offline_val", "PROMPT_TEMPLATES"]

CLIP_CHARS = vd.PRETRAIN_CHARS + "0123456789"
FONTS = list(vd.FONT_DOMAINS["dejavu"])

_CAPTION_TEMPLATES = (
    "{a} {desc} in {family}, {style}",
    "the {desc} set in {style} {family}",
    "{family} {style} glyph of the {desc}",
    "a rendering of the {desc}, {family} font, {style} style",
    "white {desc} on black, typeface {family} ({style})",
    "the character {char} ({desc}) in {style} {family}",
)
PROMPT_TEMPLATES = ("{a} {desc}", "the {desc}", "a rendering of the {desc}", "a glyph of the {desc}",
                    "the character {char} ({desc})")
_DIGIT_WORDS = "zero one two three four five six seven eight nine".split()


@dataclasses.dataclass
class ClipPairs:
    """Image-caption pairs: ``images`` ``(N, 1, H, W)`` uint8, ``captions[i]`` describes
    ``images[i]``; ``labels[i]`` indexes ``chars`` and ``fonts[i]`` indexes ``FONTS``."""

    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor
    fonts: torch.Tensor
    chars: str


def describe(ch: str) -> str:
    """The class name of a character, with its case.

    Example:
        >>> [describe(c) for c in "Aa7βΓ?"]
        ['uppercase letter A', 'lowercase letter a', 'digit seven (7)', 'Greek lowercase letter beta', \
'Greek uppercase letter gamma', 'symbol question mark']
    """
    if len(ch) != 1:
        raise ValueError(f"expected one character, got {ch!r}")
    if ch.isdigit():
        return f"digit {_DIGIT_WORDS[int(ch)]} ({ch})"
    name = unicodedata.name(ch, "").lower()
    if name.startswith("greek"):
        case = "uppercase" if ch.isupper() else "lowercase"
        return f"Greek {case} letter {name.split()[-1]}"
    if ch.isalpha():
        return f"{'uppercase' if ch.isupper() else 'lowercase'} letter {ch}"
    return f"symbol {name or repr(ch)}"


def font_description(font_file: str) -> tuple[str, str]:
    """``(family, style)`` of a DejaVu font file name.

    Example:
        >>> font_description("DejaVuSansMono-BoldOblique.ttf")
        ('DejaVu Sans Mono', 'bold oblique')
    """
    stem = font_file.rsplit(".", 1)[0]
    base, _, style = stem.partition("-")
    family = base.replace("DejaVu", "DejaVu ").replace("Mono", " Mono").strip()
    style = style.replace("Bold", "bold ").replace("Oblique", "oblique").replace("Italic", "italic").strip()
    return family, style or "regular"


def caption(ch: str, font_file: str, template: int) -> str:
    """One templated caption of character ``ch`` in ``font_file``.

    Example:
        >>> caption("g", "DejaVuSerif-BoldItalic.ttf", 1)
        'the lowercase letter g set in bold italic DejaVu Serif'
    """
    family, style = font_description(font_file)
    return _CAPTION_TEMPLATES[template % len(_CAPTION_TEMPLATES)].format(
        a=_article(describe(ch)), desc=describe(ch), family=family, style=style, char=ch)


def class_prompts(chars: str) -> list[list[str]]:
    """Zero-shot prompts per class (they name the character, not the font).

    Example:
        >>> class_prompts("A")[0][:2]
        ['an uppercase letter A', 'the uppercase letter A']
    """
    return [[t.format(a=_article(describe(c)), desc=describe(c), char=c) for t in PROMPT_TEMPLATES] for c in chars]


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def _sizes(tiny: bool, per_font: int | None) -> tuple[str, list[str], int]:
    if tiny:
        return "ABCabcαβ!?0123", FONTS[:4], per_font or 2
    return CLIP_CHARS, FONTS, per_font or 2


def offline_pairs(*, seed: int = 0, tiny: bool = False, per_font: int | None = None) -> ClipPairs:
    """The offline pre-training pairs: every character in every DejaVu font,
    ``per_font`` augmented renderings each (default 2), one caption per image.

    Example:
        >>> p = offline_pairs(tiny=True)
        >>> p.captions[0]
        'an uppercase letter A in DejaVu Sans, regular'
    """
    chars, fonts, per = _sizes(tiny, per_font)
    rng = np.random.default_rng(seed)
    xs, ys, fs = [], [], []
    for f, font in enumerate(fonts):
        x, y = vd.render_glyphs(chars, [font], per, seed=seed * 1000 + f)
        xs.append(x)
        ys.append(y)
        fs.append(torch.full_like(y, f))
    images, labels, font_idx = torch.cat(xs), torch.cat(ys), torch.cat(fs)
    templates = rng.integers(len(_CAPTION_TEMPLATES), size=len(labels))
    templates[0] = 0
    caps = [caption(chars[int(c)], fonts[int(f)], int(t)) for c, f, t in zip(labels, font_idx, templates)]
    return ClipPairs(images, caps, labels, font_idx, chars)


def offline_val(*, seed: int = 0, tiny: bool = False, per_char: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The clean validation split for zero-shot accuracy: ``(images, labels, chars)``,
    ``per_char`` renderings per character in random DejaVu fonts (other seeds than
    :func:`offline_pairs`).

    Example:
        >>> x, y, chars = offline_val(tiny=True)
        >>> len(x) == 2 * len(chars)
        True
    """
    chars, fonts, _ = _sizes(tiny, None)
    per = per_char or (2 if tiny else 3)
    x, y = vd.render_glyphs(chars, fonts, per, seed=seed * 1000 + 997)
    return x, y, chars
