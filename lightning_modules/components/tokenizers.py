"""Tokenizers built offline, exactly as a hub tokenizer loads, and the corpus they are learned from.

No tokenizer can be downloaded here, and a random-init model still needs a real tokenizer of its
family's kind. `build_tokenizer(kind, vocab_size)` learns a CLIP-style BPE, a T5-style Unigram-shaped
BPE, a Qwen-style byte-level BPE (with the Qwen2.5-VL special tokens and chat template) or a Chameleon-style
byte-level BPE whose vocabulary is extended with image-code tokens and the image-structure specials of
Lumina-mGPT / PURE (`image_codes`), on a
generated corpus (the instruction language of the synthetic data plus ordinary words), saves it with
`save_pretrained` and loads it back with `AutoTokenizer.from_pretrained`; built once, cached under
`$OMNILAB_CACHE/tokenizers/<kind>-<vocab>` (default `~/.cache/omnilab`). The merges come from a
deterministic BPE learner (`learn_bpe`), so the same build gives the same ids in every process.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

TokenizerKind = Literal["clip", "t5", "qwen", "chameleon"]
CORPUS_VERSION = 2  # bump when the corpus or a tokenizer recipe changes: cached tokenizers are rebuilt

# --- the generated corpus ------------------------------------------------------------------------------


def _words(text: str, sep: str | None = None) -> list[str]:
    """The words of `text` (split on whitespace, or on `sep`)."""
    return text.split(sep)


COLOURS = _words("red orange yellow green blue purple pink brown black white grey gold silver cyan magenta")
SHAPES = _words("circle square triangle star disk ring cross heart hexagon diamond box ball cube cone stripe")
OBJECTS = _words(
    "cat dog person woman man child hat cup chair table car bicycle tree flower house rocket astronaut "
    "coffee motorcycle bag shirt dress shoe lamp book bottle clock window door sky road grass water"
)
POSITIONS = _words(
    "left of|right of|above|below|next to|behind|in front of|on top of|under|inside|near|beside|"
    "at the centre of|in the top left corner of|in the bottom right corner of",
    sep="|",
)
SIZES = _words("small large tiny big huge thin wide tall short")
VERBS = _words("put place move add insert remove replace paint colour make turn change keep combine")
STYLES = _words("photo painting sketch cartoon watercolour render drawing")
WORDS = _words(
    "the a an of and with in on to from for by is are be it this that these those as at or not all "
    "image picture scene background foreground object subject style texture light shadow colour shape "
    "size detail original new same other both each every only also while where when there here then "
    "edit generate compose keep consistent preserve identity pose face hand holding wearing sitting "
    "standing looking beautiful realistic high quality sharp natural bright dark soft warm cool "
    "describe key features input explain how user text instruction should alter modify meets "
    "requirements maintaining consistency where appropriate system assistant helpful you are"
)
QWEN_EDIT_SYSTEM = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate."
)
QWEN_EDIT_TEMPLATE = (
    "<|im_start|>system\n" + QWEN_EDIT_SYSTEM + "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
IMAGE_PAD = "<|image_pad|>"
PICTURE_TEMPLATE = "Picture {}: <|vision_start|>" + IMAGE_PAD + "<|vision_end|>"


RESTORATION_INSTRUCTION = "Perceive the degradation level, understand the image content, and restore the high-quality image."  # PURE's instruction (README, inference example)
LEVELS = _words("Small Medium Large small medium large")
DESCRIPTION_WORDS = _words(
    "features shows depicts photograph close-up view astronaut spacesuit flag cup coffee saucer plate "
    "cat tabby whiskers rocket launch pad smoke tower tissue stained cells microscope galaxies stars "
    "space deep field motorcycle parked wall wooden stone metal red orange blue green white black sky "
    "grass road building window light shadow detailed texture background foreground lion majestic"
)


def restoration_corpus(n: int = 800, seed: int = 0) -> list[str]:
    """`n` deterministic answers in PURE's layout ("Medium blur, small noise. The image features ..."), plus its instruction."""
    rng = np.random.default_rng(seed)

    def pick(words: list[str]) -> str:
        return words[int(rng.integers(len(words)))]

    def answer() -> str:
        words = " ".join(pick(DESCRIPTION_WORDS + WORDS) for _ in range(int(rng.integers(3, 12))))
        return f"{pick(LEVELS[:3])} blur, {pick(LEVELS[3:])} noise. The image features a {words}."

    return [*[RESTORATION_INSTRUCTION] * 20, *(answer() for _ in range(n))]


def synthetic_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """`n` deterministic sentences of the edit-instruction language (colours, shapes, positions, image k)."""
    rng = np.random.default_rng(seed)

    def pick(words: list[str]) -> str:
        return words[int(rng.integers(len(words)))]

    def thing() -> str:
        return f"the {pick(SIZES)} {pick(COLOURS)} {pick(SHAPES + OBJECTS)}"

    def image() -> str:
        return f"{pick(['image', 'picture', 'Image', 'Picture'])} {int(rng.integers(1, 7))}"

    templates = [
        lambda: (
            f"{pick(VERBS).capitalize()} {thing()} from {image()} {pick(POSITIONS)} {thing()} in {image()}."
        ),
        lambda: f"Change the background of {image()} to {pick(COLOURS)}.",
        lambda: f"Make {thing()} {pick(COLOURS)} and keep everything else the same.",
        lambda: f"Combine {thing()} from {image()} with {thing()} from {image()}, {pick(POSITIONS)} it.",
        lambda: f"A {pick(STYLES)} of {thing()} {pick(POSITIONS)} {thing()}.",
        lambda: f"Remove {thing()} and add {thing()} {pick(POSITIONS)} {thing()}.",
        lambda: " ".join(pick(WORDS) for _ in range(int(rng.integers(4, 16)))) + ".",
        lambda: (
            f"Picture {int(rng.integers(1, 7))}: {pick(WORDS)} {pick(OBJECTS)} {int(rng.integers(0, 100))}"
        ),
    ]
    lines = [templates[int(rng.integers(len(templates)))]() for _ in range(n)]
    return [*[QWEN_EDIT_SYSTEM] * 20, *lines]  # the edit system prompt, often enough to be merged


# --- tokenizers ----------------------------------------------------------------------------------------

ASCII = [chr(c) for c in range(32, 127)]
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# Qwen2-VL's chat template (Qwen/Qwen2.5-VL-7B-Instruct, chat_template.json)
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bpe(words: dict[tuple[str, ...], int], n_merges: int) -> tuple[list[tuple[str, str]], dict]:
    """`learn_bpe`, also returning the words as segmented after the last merge."""
    words = dict(words)
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: dict[tuple[str, str], int] = {}
        for symbols, count in words.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))  # most frequent; a tie: the smaller pair
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges, words


def learn_bpe(words: dict[tuple[str, ...], int], n_merges: int) -> list[tuple[str, str]]:
    """BPE merges of words given as symbol tuples with counts: the most frequent pair first, ties to the smaller.

    Deterministic, unlike the `tokenizers` trainers whose hash-map order changes the ids from one build to the
    next (their CLIP-style BPE and Unigram trainers): every tiny model's text embedding depends on these ids.
    """
    return _bpe(words, n_merges)[0]


def _word_counts(tok: Any, corpus: list[str], suffix: str = "") -> dict[tuple[str, ...], int]:
    """The corpus as the tokenizer's normalizer and pre-tokenizer split it: {symbols: count}, `suffix` on the last."""
    counts: dict[tuple[str, ...], int] = {}
    for line in corpus:
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(line)):
            symbols = (*word[:-1], word[-1] + suffix)
            counts[symbols] = counts.get(symbols, 0) + 1
    return counts


def _alphabet(corpus: list[str]) -> list[str]:
    """ASCII and any other character of the corpus, sorted."""
    return sorted(set(ASCII) | set("".join(corpus)))


def _clip_tokenizer(vocab_size: int, corpus: list[str]) -> PreTrainedTokenizerFast:
    """CLIP-style: lower-cased word BPE with the "</w>" end-of-word suffix, wrapped in start/end tokens."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    start, end = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(models.BPE(unk_token=end, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    # ids 0 and 1 for the specials (an eos id of 2 would switch CLIP to argmax pooling), then the characters
    # with and without the end-of-word suffix, then the merges
    alphabet = _alphabet(corpus)
    base = [start, end, *alphabet, *(c + "</w>" for c in alphabet)]
    merges = learn_bpe(_word_counts(tok, corpus, "</w>"), max(vocab_size - len(base), 0))
    vocab = {token: i for i, token in enumerate([*base, *(a + b for a, b in merges)])}
    tok.model = models.BPE(vocab=vocab, merges=merges, unk_token=end, end_of_word_suffix="</w>")
    tok.add_special_tokens([start, end])
    ids = [(start, tok.token_to_id(start)), (end, tok.token_to_id(end))]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{start} $A {end}", pair=f"{start} $A {end} $B {end}", special_tokens=ids
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=start,
        eos_token=end,
        unk_token=end,
        pad_token=end,
        model_max_length=77,
    )


def _t5_tokenizer(vocab_size: int, corpus: list[str]) -> PreTrainedTokenizerFast:
    """T5-style: sentencepiece-like unigram with "▁" word starts, </s> appended; pad 0, </s> 1, unk 2."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    # the pieces: characters, then BPE merges of the "▁word" pieces (learn_bpe, deterministic); each piece
    # scored by its log frequency in the corpus as BPE segments it (unused characters just below the least used)
    specials = ["<pad>", "</s>", "<unk>"]  # T5's ids 0, 1, 2
    alphabet = sorted(set(_alphabet(corpus)) | {"▁"})
    merges, segmented = _bpe(_word_counts(tok, corpus), max(vocab_size - len(specials) - len(alphabet), 0))
    freq: dict[str, int] = {}
    for symbols, count in segmented.items():
        for piece in symbols:
            freq[piece] = freq.get(piece, 0) + count
    total = sum(freq.values())
    floor = math.log(1 / total) - 1.0
    pieces = list(dict.fromkeys([*alphabet, *(a + b for a, b in merges)]))
    scores = [(p, math.log(freq[p] / total) if p in freq else floor) for p in pieces]
    tok.model = models.Unigram([(t, 0.0) for t in specials] + scores, unk_id=2, byte_fallback=False)
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", model_max_length=512
    )


def _qwen_tokenizer(vocab_size: int, corpus: list[str]) -> PreTrainedTokenizerFast:
    """Qwen2-style: byte-level BPE with Qwen2's split pattern, the chat/vision specials, a chat template."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # no bos/eos added, as Qwen2
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        additional_special_tokens=QWEN_SPECIALS[1:],
        chat_template=QWEN_CHAT_TEMPLATE,
    )


# Chameleon's vocabulary (facebook/chameleon, as Lumina-mGPT and PURE read it): <s> <pad> </s> <unk> at ids 0-3,
# then the image-code tokens "IMGIMG<code digits as letters A-J>Z" (so code c sits at id 4 + c), then text.
# The image structure of Lumina-mGPT (`pure/data/item_processor.py`): an image is <racm3:break>, two grid-size
# tokens <reserved{8800 + n}>, rows of codes each closed by <reserved08799>, then <eoss>; a turn ends with
# <reserved08706>; <|image|> marks where an image goes in a conversation.
CHAMELEON_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
IMAGE_START, IMAGE_END, ROW_END, TURN_END = "<racm3:break>", "<eoss>", "<reserved08799>", "<reserved08706>"
IMAGE_PLACEHOLDER = "<|image|>"
GRID_TOKEN_BASE = 8800  # <reserved{8800 + n}> says "n grid cells"
MAX_GRID = 64  # grid-size tokens for 0..64 cells (2048 px at 32 px a cell)


def grid_token(n: int) -> str:
    """The grid-size token for n cells: `<reserved{8800 + n:05d}>`."""
    return f"<reserved{GRID_TOKEN_BASE + n:05d}>"


def image_code_token(code: int) -> str:
    """Chameleon's name of image code `code`: "IMGIMG" + its decimal digits written as letters A-J + "Z"."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def image_code_of(token: str) -> int | None:
    """The code an "IMGIMG...Z" token names (Chameleon's `bpe2img` rule), or None for any other token."""
    if not (token.startswith("IMGIMG") and token.endswith("Z") and len(token) > 7):
        return None
    digits = token[6:-1]
    return (
        int("".join(str(ord(c) - ord("A")) for c in digits)) if all("A" <= c <= "J" for c in digits) else None
    )


def _chameleon_tokenizer(vocab_size: int, corpus: list[str], image_codes: int = 0) -> PreTrainedTokenizerFast:
    """Chameleon-style: byte-level BPE, <s> <pad> </s> <unk> at 0-3, `image_codes` IMGIMG tokens at 4.., structure specials.

    `vocab_size` counts the text part (the four specials, 256 bytes, merges); the image codes and the structure
    specials (image start/end, row end, turn end, the grid sizes 0..64, <|image|>) come on top.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [*corpus, *restoration_corpus()]
    images = [image_code_token(c) for c in range(image_codes)]
    base = [*CHAMELEON_SPECIALS, *images, *sorted(pre_tokenizers.ByteLevel.alphabet())]
    merges = learn_bpe(_word_counts(tok, corpus), max(vocab_size - len(CHAMELEON_SPECIALS) - 256, 0))
    vocab = {token: i for i, token in enumerate([*base, *(a + b for a, b in merges)])}
    tok.model = models.BPE(vocab=vocab, merges=merges)
    structure = [IMAGE_START, IMAGE_END, TURN_END, ROW_END, *(grid_token(n) for n in range(MAX_GRID + 1))]
    tok.add_special_tokens([*CHAMELEON_SPECIALS, *images, *structure, IMAGE_PLACEHOLDER])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=131072,
    )


TOKENIZER_RECIPES = {
    "clip": _clip_tokenizer,
    "t5": _t5_tokenizer,
    "qwen": _qwen_tokenizer,
    "chameleon": _chameleon_tokenizer,
}


def tokenizer_cache_dir() -> Path:
    """Where built tokenizers are cached: `$OMNILAB_CACHE/tokenizers` (default `~/.cache/omnilab`)."""
    root = os.environ.get("OMNILAB_CACHE") or Path.home() / ".cache" / "omnilab"
    return Path(root) / "tokenizers"


def build_tokenizer(
    kind: TokenizerKind, vocab_size: int = 512, out_dir: str | Path | None = None, image_codes: int = 0
) -> PreTrainedTokenizerFast:
    """A CLIP-, T5-, Qwen- or Chameleon-style tokenizer trained offline; saved once, then loaded with AutoTokenizer.

    `image_codes` (Chameleon only) adds that many image-code tokens. The folder (`out_dir`, default
    `tokenizer_cache_dir()/<kind>-<vocab_size>[-img<image_codes>]`) is reused when its
    `omnilab_tokenizer.json` names the same kind, vocabulary size and corpus version; otherwise the
    tokenizer is trained on `synthetic_corpus()` (deterministic: the same ids every time), written to a
    temporary folder and moved into place, so concurrent builders never see half a tokenizer.
    """
    if kind not in TOKENIZER_RECIPES:
        raise ValueError(f"tokenizer kind {kind!r}: choose {', '.join(TOKENIZER_RECIPES)}")
    if image_codes and kind != "chameleon":
        raise ValueError(f"image_codes={image_codes}: only the chameleon tokenizer has image-code tokens")
    name = f"{kind}-{vocab_size}" + (f"-img{image_codes}" if image_codes else "")
    out = Path(out_dir) if out_dir is not None else tokenizer_cache_dir() / name
    stamp = {"kind": kind, "vocab_size": vocab_size, "corpus_version": CORPUS_VERSION}
    extra = {"image_codes": image_codes} if image_codes else {}
    stamp.update(extra)
    marker = out / "omnilab_tokenizer.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == stamp):
        tokenizer = TOKENIZER_RECIPES[kind](vocab_size, synthetic_corpus(), **extra)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        tokenizer.save_pretrained(tmp)
        (tmp / "omnilab_tokenizer.json").write_text(json.dumps(stamp))
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)
        try:
            tmp.rename(out)
        except OSError:  # another process moved its (identical) build in first
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(out)


def load_tokenizer(
    spec: dict[str, Any] | None,
    kind: TokenizerKind,
    pretrained: str | None = None,
    subfolder: str | None = None,
) -> PreTrainedTokenizerBase:
    """A tokenizer from `spec`: `{pretrained: dir-or-id, subfolder?}`, or `{vocab_size, out_dir}` built offline.

    With no spec, a `pretrained` model's own tokenizer folder (`subfolder`) is used, else a built one of
    `kind` with 512 tokens. `model_max_length` in the spec overrides the tokenizer's.
    """
    spec = dict(spec or {})
    max_length = spec.pop("model_max_length", None)
    if "pretrained" in spec:
        tokenizer = AutoTokenizer.from_pretrained(spec.pop("pretrained"), **spec)
    elif pretrained is not None and not spec:
        tokenizer = AutoTokenizer.from_pretrained(pretrained, subfolder=subfolder)
    else:
        tokenizer = build_tokenizer(spec.pop("kind", kind), **spec)
    if max_length is not None:
        tokenizer.model_max_length = int(max_length)
    return tokenizer
