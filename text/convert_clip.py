"""Converts a CLIP checkpoint's text tower (safetensors) to the .npz that `text.clip` loads.

    python -m text.convert_clip model.safetensors [~/.cache/ddpm_jax/clip_text.npz]

Input, user-supplied (nothing is downloaded here), safetensors only (a .bin / .pt is a pickle
and is refused):
  * Hugging Face: `model.safetensors` of openai/clip-vit-base-patch32 or
    openai/clip-vit-large-patch14 (`text_model.*` + `text_projection.weight`). Heads and the
    activation come from the `config.json` beside it when present, else heads = width / 64 and
    quick_gelu (true of both OpenAI checkpoints).
  * open_clip: `open_clip_model.safetensors` of an open_clip model on the Hugging Face Hub
    (`token_embedding.weight`, `positional_embedding`, `transformer.resblocks.N.{ln_1, attn.
    in_proj_weight (q, k, v fused), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`,
    `text_projection` [D, P] used as x @ W; optionally under a `text.` prefix). open_clip does
    not record the activation in the weights: it is read from `open_clip_config.json` beside the
    file ("quick_gelu": true for OpenAI weights and *-quickgelu models, GELU otherwise), or must
    be given with --activation.
Output: float32 arrays under Hugging Face's names and layouts, plus "config" (a JSON string of
`clip.ClipTextConfig`); every key and shape is checked against the Flax model before writing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence

import numpy as np

from errors import UserError
from text import clip, transformer

_HF_TOKENS = "text_model.embeddings.token_embedding.weight"


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """The text-tower tensors of a safetensors file as float32 numpy (no torch)."""
    from safetensors import safe_open

    if not path.endswith(".safetensors"):
        raise UserError(f"{path} is not a .safetensors file (a .bin/.pt/.pth checkpoint is a "
                        "pickle, which this converter does not read). Fix: download the "
                        "checkpoint's safetensors file instead: model.safetensors (Hugging Face) "
                        "or open_clip_model.safetensors (open_clip)")
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist. Fix: download {clip.SOURCES['vit-b-32']} "
                        f"(or {clip.SOURCES['vit-l-14']}), then run python -m text.convert_clip "
                        "model.safetensors")
    with safe_open(path, framework="np") as f:
        return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()
                if not k.startswith(("vision_model.", "visual.", "visual_projection"))}


def open_clip_to_hf(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames an open_clip text tower to Hugging Face's names, splitting the fused in_proj
    (rows q, k, v, as torch's nn.MultiheadAttention) and transposing text_projection."""
    prefix = "text." if "text.token_embedding.weight" in arrays else ""
    a = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    if "text_projection" not in a:
        raise UserError("this open_clip checkpoint has no text_projection matrix (a Linear "
                        "projection or none): only CLIP towers with a [D, P] projection are "
                        "supported")
    m = "text_model"
    out = {f"{m}.embeddings.token_embedding.weight": a["token_embedding.weight"],
           f"{m}.embeddings.position_embedding.weight": a["positional_embedding"],
           f"{m}.final_layer_norm.weight": a["ln_final.weight"],
           f"{m}.final_layer_norm.bias": a["ln_final.bias"],
           "text_projection.weight": a["text_projection"].T}
    for i in range(_count_layers(a, r"transformer\.resblocks\.(\d+)\.")):
        src, dst = f"transformer.resblocks.{i}", f"{m}.encoder.layers.{i}"
        for kind in ("weight", "bias"):
            q, k, v = np.split(a[f"{src}.attn.in_proj_{kind}"], 3, axis=0)
            for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{dst}.self_attn.{name}.{kind}"] = part
            for theirs, ours in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                                 ("mlp.c_proj", "mlp.fc2")):
                out[f"{dst}.{ours}.{kind}"] = a[f"{src}.{theirs}.{kind}"]
    return out


def _count_layers(arrays: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in arrays if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _config_beside(path: str, name: str) -> dict:
    sidecar = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    if not os.path.isfile(sidecar):
        return {}
    with open(sidecar) as f:
        return json.load(f)


def infer_config(hf: dict[str, np.ndarray], *, heads: int, activation: str
                 ) -> clip.ClipTextConfig:
    vocab, width = hf[_HF_TOKENS].shape
    return clip.ClipTextConfig(
        width=width, num_layers=_count_layers(hf, r"text_model\.encoder\.layers\.(\d+)\."),
        num_heads=heads or width // 64,
        mlp_width=hf["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        projection_dim=hf["text_projection.weight"].shape[0], vocab_size=vocab,
        context_length=hf["text_model.embeddings.position_embedding.weight"].shape[0],
        activation=activation)


def to_hf(path: str, arrays: dict[str, np.ndarray], *, heads: int = 0, activation: str = ""
          ) -> tuple[clip.ClipTextConfig, dict[str, np.ndarray]]:
    """(config, HF-named text-tower arrays) of a checkpoint in either format."""
    if _HF_TOKENS in arrays:
        if "text_projection.weight" not in arrays:
            raise UserError(f"{path} has no text_projection.weight (a CLIPTextModel without "
                            "projection, e.g. Stable Diffusion's text_encoder). Fix: use the "
                            f"full CLIP checkpoint, {clip.SOURCES['vit-b-32']}")
        text_cfg = _config_beside(path, "config.json").get("text_config", {})
        hf = {k: v for k, v in arrays.items()
              if k.startswith("text_model.") and not k.endswith("position_ids")}
        hf["text_projection.weight"] = arrays["text_projection.weight"]
        heads = heads or text_cfg.get("num_attention_heads", 0)
        activation = activation or text_cfg.get("hidden_act", "quick_gelu")
    elif "token_embedding.weight" in arrays or "text.token_embedding.weight" in arrays:
        hf = open_clip_to_hf(arrays)
        model_cfg = _config_beside(path, "open_clip_config.json").get("model_cfg")
        if model_cfg is not None:
            heads = heads or model_cfg.get("text_cfg", {}).get("heads", 0)
            activation = activation or ("quick_gelu" if model_cfg.get("quick_gelu") else "gelu")
        if not activation:
            raise UserError(f"{path} is an open_clip checkpoint without open_clip_config.json "
                            "beside it, so its activation is unknown. Fix: pass "
                            "--activation=quick_gelu (OpenAI weights, *-quickgelu models) or "
                            "--activation=gelu (e.g. LAION's ViT-B-32 / ViT-L-14)")
    else:
        raise UserError(f"{path} holds neither a Hugging Face CLIP text tower ({_HF_TOKENS}) nor "
                        "an open_clip one (token_embedding.weight). Fix: use "
                        f"{clip.SOURCES['vit-b-32']} or an open_clip open_clip_model.safetensors")
    if activation not in transformer.ACTIVATIONS:
        raise UserError(f"activation {activation!r} is not supported. Fix: use one of "
                        f"{sorted(transformer.ACTIVATIONS)}")
    config = infer_config(hf, heads=heads, activation=activation)
    if config.width % config.num_heads:
        raise UserError(f"--heads={config.num_heads} does not divide the width {config.width}. "
                        "Fix: pass the checkpoint's number of attention heads")
    return config, hf


def convert(in_path: str, out_path: str, *, heads: int = 0, activation: str = ""
            ) -> clip.ClipTextConfig:
    config, hf = to_hf(in_path, read_safetensors(in_path), heads=heads, activation=activation)
    try:
        params = clip.hf_to_flax(hf, config.num_layers)
    except KeyError as e:
        raise UserError(f"{in_path} lacks the text-tower weight {e}") from None
    transformer.check_params(params, clip.abstract_params(config), source=in_path,
                             fix="use one of the checkpoints named in text/convert_clip.py")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    np.savez(out_path, config=np.array(json.dumps(dataclasses.asdict(config))), **hf)
    return config


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="model.safetensors (HF) or open_clip_model.safetensors")
    parser.add_argument("npz", nargs="?", default=os.path.expanduser(clip.DEFAULT_WEIGHTS))
    parser.add_argument("--heads", type=int, default=0, help="default: config file, or width/64")
    parser.add_argument("--activation", default="", choices=["", *transformer.ACTIVATIONS])
    args = parser.parse_args(argv)
    try:
        config = convert(args.checkpoint, args.npz, heads=args.heads, activation=args.activation)
    except UserError as e:  # the message names the fix; a traceback would bury it
        sys.exit(f"error: {e}")
    print(f"wrote {args.npz}: {config}")


if __name__ == "__main__":
    main()
