"""What the text-encoder parity tests and their reference script share (numpy only).

`tests/reference/make_text_references.py` runs these inputs through the PyTorch references once
(sentence-transformers, transformers, open_clip, OpenAI CLIP's tokenizer) in a scratch venv and
writes the JSON files beside it; `tests/test_text_encoders.py` runs the same inputs through our
Flax ports and compares. The random CLIP weights are generated here, from a seed, by both sides,
so no weights file is committed.
"""

from __future__ import annotations

import os

import numpy as np

REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")

# >= 20 sentences for the MiniLM embeddings: digits vs words, punctuation, unicode, long ones
# (over 32 tokens: truncated at our default max_length).
SENTENCES = [
    "seven", "7", "3", "the digit 3", "a thick seven leaning left", "a thin seven leaning right",
    "", "A BOLD 7, LEANING RIGHT!", "the digit seven, thin pen.", "zero 0 one 1 two 2",
    "Ein dünner Strich: fünf.", "café naïve résumé — déjà vu", "数字七", "emoji 🙂 and 7️⃣",
    "it's a small, slanted '4' (with a serif)...", "1234567890", "   spaces   everywhere   ",
    "a handwritten digit eight drawn with a very thick marker pen, slightly rotated "
    "clockwise, centred in the frame, on a black background with no noise at all",
    "nine nine nine nine nine nine nine nine nine nine nine nine nine nine nine nine nine "
    "nine nine nine nine nine nine nine nine nine nine nine nine nine nine nine nine nine",
    "tab\tand\nnewline", "x²+y²=z²", "Ünïcödé ÀÉÎÕÜ ßø", "hello-world_foo/bar@baz.com #tag",
    "a six that looks like a b",
]
MINILM_LENGTH = 32  # the encoder's default max_length
FULL_STATES = ("seven", "the digit 3")  # token states stored in full; the rest projected

# >= 50 strings for the tokenizers: unicode, accents, emoji, punctuation, numbers, whitespace
# runs, the empty string, HTML entities, over-length.
TOKENIZER_STRINGS = SENTENCES + [
    "Hello, World!", "HELLO world", "don't won't it's we're they've I'm we'll he'd",
    "3.14159 and 2,718 and 1e-5", "100%", "$5.99!!!", "¿Qué tal? ¡Muy bien!", "naïve café",
    "Ελληνικά κείμενα", "русский текст", "עברית", "العربية", "日本語のテキスト", "한국어 텍스트",
    "emoji 👍🏽👨‍👩‍👧 🚀", "“curly quotes” and ‘single’", "fish &amp; chips &lt;3",
    "ﬁne ligatures ﬂow", "ｆｕｌｌｗｉｄｔｈ　ｓｐａｃｅ", "\u00a0non-breaking\u2009thin space",
    "a\u0301 combining accent", "   ", "\t\n", "a   b\t\tc\n\nd", "<|endoftext|> inside",
    "...", "!!!???", "snake_case and camelCase and kebab-case", "http://example.com/a?b=c&d=e",
    "ALL CAPS SENTENCE WITH 12345 NUMBERS", "mixed123numbers456", "½ ¾ ⅓ ² ³ Ⅻ",
    "a " * 150, "supercalifragilisticexpialidocious " * 12,
]
TOKENIZER_LENGTHS = {"minilm": (32, 128), "clip": (77, 20)}

# A small CLIP text tower with the full vocabulary and context; random weights from a seed.
CLIP_TINY = dict(width=64, num_layers=3, num_heads=4, mlp_width=256, projection_dim=32,
                 vocab_size=49408, context_length=77, activation="quick_gelu")
CLIP_SEED = 0
CLIP_TEXTS = ["a photo of a thin seven", "", "the digit 3 &amp; the digit 8",
              "a very long caption " * 20]


def clip_random_hf_weights(seed: int = CLIP_SEED, cfg: dict = CLIP_TINY) -> dict:
    """float32 arrays under HF CLIPTextModelWithProjection's state_dict names. Layer norms and
    biases are random too, so swapping any two of them changes the output."""
    rng = np.random.default_rng(seed)
    d, f, p = cfg["width"], cfg["mlp_width"], cfg["projection_dim"]

    def normal(*shape, std):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    m = "text_model"
    w = {f"{m}.embeddings.token_embedding.weight": normal(cfg["vocab_size"], d, std=0.5),
         f"{m}.embeddings.position_embedding.weight": normal(cfg["context_length"], d, std=0.3)}
    for i in range(cfg["num_layers"]):
        pre = f"{m}.encoder.layers.{i}"
        for name, (out_dim, in_dim) in {
                "self_attn.q_proj": (d, d), "self_attn.k_proj": (d, d),
                "self_attn.v_proj": (d, d), "self_attn.out_proj": (d, d),
                "mlp.fc1": (f, d), "mlp.fc2": (d, f)}.items():
            w[f"{pre}.{name}.weight"] = normal(out_dim, in_dim, std=2.0 / np.sqrt(in_dim))
            w[f"{pre}.{name}.bias"] = normal(out_dim, std=0.1)
        for name in ("layer_norm1", "layer_norm2"):
            w[f"{pre}.{name}.weight"] = 1 + normal(d, std=0.2)
            w[f"{pre}.{name}.bias"] = normal(d, std=0.2)
    w[f"{m}.final_layer_norm.weight"] = 1 + normal(d, std=0.2)
    w[f"{m}.final_layer_norm.bias"] = normal(d, std=0.2)
    w["text_projection.weight"] = normal(p, d, std=1 / np.sqrt(d))
    return w


def hf_to_open_clip_names(hf: dict, num_layers: int) -> dict:
    """The same tower under open_clip's `TextTransformer` names: q, k, v fused into
    attn.in_proj_* (rows q; k; v, torch's nn.MultiheadAttention), text_projection [D, P]. The
    reference script loads this into open_clip's own module with strict=True."""
    m = "text_model"
    oc = {"token_embedding.weight": hf[f"{m}.embeddings.token_embedding.weight"],
          "positional_embedding": hf[f"{m}.embeddings.position_embedding.weight"],
          "ln_final.weight": hf[f"{m}.final_layer_norm.weight"],
          "ln_final.bias": hf[f"{m}.final_layer_norm.bias"],
          "text_projection": np.ascontiguousarray(hf["text_projection.weight"].T)}
    for i in range(num_layers):
        src, dst = f"{m}.encoder.layers.{i}", f"transformer.resblocks.{i}"
        for kind in ("weight", "bias"):
            oc[f"{dst}.attn.in_proj_{kind}"] = np.concatenate(
                [hf[f"{src}.self_attn.{n}_proj.{kind}"] for n in ("q", "k", "v")], axis=0)
            for theirs, ours in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                                 ("mlp.c_proj", "mlp.fc2")):
                oc[f"{dst}.{theirs}.{kind}"] = hf[f"{src}.{ours}.{kind}"]
    return oc


def projection(dim: int, k: int = 16, seed: int = 1234) -> np.ndarray:
    """A fixed random [dim, k] matrix, columns of norm ~1: token states are stored projected."""
    return (np.random.default_rng(seed).standard_normal((dim, k)) / np.sqrt(dim)).astype(
        np.float64)
