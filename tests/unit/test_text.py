"""Tokenizer round trip, caption encoding and sequence packing (hand-checked)."""

import json

import pytest

from heygen_ray.config import ConfigError
from heygen_ray.data.text import TextTokenizer, encode_captions, iter_corpus, pack_sequences, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "corpus.jsonl"
    docs = [f"a red circle moves left {'quickly' if i % 2 else 'slowly'}. number {i}" for i in range(200)]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    train_tokenizer(str(corpus), str(d / "tok"), vocab_size=300, min_frequency=2)
    return TextTokenizer.load(str(d / "tok"))


@pytest.mark.parametrize("text", ["a red circle moves left", "  spaces  and\ttabs\n", "ünïcødé ✓ 漢字 🎬", "x"])
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


def test_merges_were_learned(tokenizer):
    # frequent words become single tokens: fewer ids than bytes
    text = "a red circle moves left"
    assert len(tokenizer.encode(text)) < len(text.encode()) / 2
    assert {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id} == {0, 1, 2}


def test_pack_sequences_by_hand():
    rows, rest = pack_sequences([[5, 6, 7], [8, 9]], seq_len=3, eos_id=2)
    # stream: 5 6 7 2 8 9 2 -> one row of 4, leftover 3 tokens
    assert rows.tolist() == [[5, 6, 7, 2]] and rest == [8, 9, 2]
    rows, rest = pack_sequences([[10]], seq_len=3, eos_id=2, carry=rest)
    assert rows.tolist() == [[8, 9, 2, 10]] and rest == [2]
    rows, rest = pack_sequences([], seq_len=3, eos_id=2)
    assert rows.shape == (0, 4) and rest == []


def test_packing_loses_no_token_but_the_tail(tokenizer):
    docs = [tokenizer.encode(f"doc {i} " * (i % 5 + 1)) for i in range(50)]
    rows, rest = pack_sequences(docs, seq_len=16, eos_id=tokenizer.eos_id)
    flat = rows.reshape(-1).tolist() + rest
    expected = [t for d in docs for t in d + [tokenizer.eos_id]]
    assert flat == expected and len(rest) < 17


def test_encode_captions_pads_and_truncates(tokenizer):
    ids, mask = encode_captions(tokenizer, ["a red circle", "a red circle moves left quickly " * 5], 8)
    n0 = len(tokenizer.encode("a red circle")) + 2
    assert ids[0, 0] == tokenizer.bos_id and ids[0, n0 - 1] == tokenizer.eos_id
    assert mask[0].sum() == n0 and (ids[0, n0:] == tokenizer.pad_id).all()
    assert mask[1].all() and ids[1, -1] == tokenizer.eos_id  # truncated, still terminated


def test_corpus_errors_name_the_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "ok"}\n{"body": "wrong field"}\n')
    with pytest.raises(ConfigError, match=r"c.jsonl:2: no field 'text'"):
        list(iter_corpus(str(p)))
    with pytest.raises(ConfigError, match="not found"):
        list(iter_corpus(str(tmp_path / "missing.jsonl")))


def test_an_embedded_tokenizer_is_loaded_without_its_folder(tokenizer, tmp_path, monkeypatch):
    """What a logged model records (data_info.tokenizer_json) is enough: it is written once per content
    into the host cache and loads identically; without it, the recorded folder; without both, None."""
    from heygen_ray.data.text import recorded_tokenizer_dir

    monkeypatch.setenv("HEYGEN_RAY_CACHE", str(tmp_path / "cache"))
    text = tokenizer.to_json()
    folder = recorded_tokenizer_dir({"tokenizer_json": text, "tokenizer_dir": str(tmp_path / "gone")})
    assert folder.startswith(str(tmp_path / "cache")) and recorded_tokenizer_dir({"tokenizer_json": text}) == folder
    again = TextTokenizer.load(folder)
    sample = "a red circle moves left, then a blue square"
    assert again.encode(sample) == tokenizer.encode(sample) and again.vocab_size == tokenizer.vocab_size
    assert recorded_tokenizer_dir({"tokenizer_dir": "/old/tok"}) == "/old/tok"
    assert recorded_tokenizer_dir({}) is None
