"""Text: a byte-level BPE tokenizer (``tokenizers``) and the Ray Data text pipelines.

* :func:`train_tokenizer` learns a byte-level BPE on a corpus and saves it to a folder
  (``tokenizer.json`` + ``meta.json``); :class:`TextTokenizer` loads it. Byte-level means every string
  round-trips exactly and no input is out of vocabulary.
* :class:`PackTokens` (language modelling) tokenizes documents and packs them, each followed by
  ``<eos>``, into fixed-length sequences: ``input_ids`` (L) and ``labels`` (L, the next tokens).
* :func:`tokenize_captions` (video-text tasks) adds ``caption_ids`` / ``caption_mask`` (padded to a
  fixed length) to a video dataset.

The tokenizer loads once per worker process, not once per batch: `PackTokens` runs in an actor pool
(the tokens that do not fill a row carry over to the actor's next batch); `tokenize_captions` is
stateless and runs as plain tasks.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from heygen_ray import fsutil
from heygen_ray.config import ConfigError, TextDataSpec

log = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = [PAD, BOS, EOS]


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def iter_corpus(uri: str, text_field: str = "text") -> Iterator[str]:
    """Documents of a JSONL (one JSON object per line) or parquet corpus, streamed."""
    if not fsutil.exists(uri):
        raise ConfigError(f"text.corpus: file not found: {uri}")
    fs, path = fsutil.filesystem(uri)
    if path.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(fs.open_input_file(path))
        if text_field not in pf.schema_arrow.names:
            raise ConfigError(f"text.corpus: {uri}: no column {text_field!r} (text.text_field)")
        for batch in pf.iter_batches(columns=[text_field]):
            yield from (t for t in batch.column(0).to_pylist() if t)
        return
    with fs.open_input_stream(path) as raw:
        for lineno, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8"), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"text.corpus: {uri}:{lineno}: not valid JSON: {err}") from None
            if not isinstance(doc, dict) or text_field not in doc:
                raise ConfigError(f"text.corpus: {uri}:{lineno}: no field {text_field!r} (text.text_field)")
            if doc[text_field]:
                yield str(doc[text_field])


def train_tokenizer(corpus: str, out_dir: str, *, vocab_size: int, min_frequency: int = 2, text_field: str = "text") -> "TextTokenizer":
    """Learn a byte-level BPE on ``corpus`` and save it under ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(iter_corpus(corpus, text_field), trainer=trainer)
    meta = {"vocab_size": tok.get_vocab_size(), "special_tokens": SPECIAL_TOKENS, "corpus": corpus,
            "requested_vocab_size": vocab_size, "min_frequency": min_frequency}
    fsutil.write_bytes(fsutil.join(out_dir, "tokenizer.json"), tok.to_str().encode())
    fsutil.write_bytes(fsutil.join(out_dir, "meta.json"), json.dumps(meta, indent=1).encode())
    return TextTokenizer(tok)


class TextTokenizer:
    """A loaded tokenizer with the ids the pipelines and models need."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.pad_id = tok.token_to_id(PAD)
        self.bos_id = tok.token_to_id(BOS)
        self.eos_id = tok.token_to_id(EOS)
        if None in (self.pad_id, self.bos_id, self.eos_id):
            raise ValueError(f"tokenizer lacks one of the special tokens {SPECIAL_TOKENS}")

    @classmethod
    def load(cls, directory: str) -> "TextTokenizer":
        from tokenizers import Tokenizer

        path = fsutil.join(directory, "tokenizer.json")
        if not fsutil.exists(path):
            raise ConfigError(f"text.tokenizer_dir: no tokenizer.json in {directory}")
        return cls(Tokenizer.from_str(fsutil.read_bytes(path).decode()))

    @classmethod
    def from_json(cls, text: str) -> "TextTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    def to_json(self) -> str:
        """The whole tokenizer as the text of its tokenizer.json (what a logged model embeds)."""
        return self.tok.to_str()

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def recorded_tokenizer_dir(data_info: Mapping[str, Any]) -> Optional[str]:
    """The tokenizer folder for a model's recorded ``data_info``: its embedded tokenizer
    (``tokenizer_json``, what training logs with the model) written once per content into this host's
    cache, so a replica or an evaluation on any node loads it from the registry alone; else the
    recorded ``tokenizer_dir`` (models logged before the tokenizer was embedded); else None."""
    import hashlib

    from heygen_ray.hostcache import cache_root

    text = data_info.get("tokenizer_json")
    if not text:
        return data_info.get("tokenizer_dir") or None
    folder = os.path.join(cache_root(), "tokenizers", hashlib.sha256(text.encode()).hexdigest()[:16])
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        fsutil.write_bytes(path, text.encode())
    return folder


def ensure_tokenizer(spec: TextDataSpec) -> Tuple[TextTokenizer, bool]:
    """Load the tokenizer in ``spec.tokenizer_dir``, training it on ``spec.corpus`` if absent.
    Returns (tokenizer, trained_now)."""
    directory = fsutil.absolute(spec.tokenizer_dir or "")
    if fsutil.exists(fsutil.join(directory, "tokenizer.json")):
        return TextTokenizer.load(directory), False
    corpus = fsutil.absolute(spec.corpus or "")
    return train_tokenizer(corpus, directory, vocab_size=spec.vocab_size, min_frequency=spec.min_frequency,
                           text_field=spec.text_field), True


# --------------------------------------------------------------------------------------------------
# Packing and caption encoding (pure)
# --------------------------------------------------------------------------------------------------


def pack_sequences(docs: Sequence[Sequence[int]], seq_len: int, eos_id: int, carry: Sequence[int] = ()) -> Tuple[np.ndarray, List[int]]:
    """Concatenate ``carry`` + each doc followed by ``eos_id`` and cut into rows of ``seq_len + 1``.

    Returns (int32 array (N, seq_len + 1), leftover tokens for the next call). Row r's inputs are
    ``row[:-1]`` and its targets ``row[1:]``.
    """
    stream: List[int] = list(carry)
    for d in docs:
        stream.extend(d)
        stream.append(eos_id)
    width = seq_len + 1
    n = len(stream) // width
    rows = np.asarray(stream[: n * width], dtype=np.int32).reshape(n, width)
    return rows, stream[n * width :]


def encode_captions(tok: TextTokenizer, captions: Sequence[str], max_tokens: int) -> Tuple[np.ndarray, np.ndarray]:
    """<bos> caption <eos>, truncated/padded to ``max_tokens``: (ids int32 (N, L), mask bool (N, L))."""
    ids = np.full((len(captions), max_tokens), tok.pad_id, dtype=np.int32)
    mask = np.zeros((len(captions), max_tokens), dtype=bool)
    for i, enc in enumerate(tok.encode_batch([str(c) for c in captions])):
        seq = ([tok.bos_id] + enc)[: max_tokens - 1] + [tok.eos_id]
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = True
    return ids, mask


class PackTokens:
    """``map_batches`` callable: documents -> packed ``input_ids``/``labels`` rows. Tokens that do not
    fill a row are carried over to this actor's next batch (only the very last partial row is lost)."""

    def __init__(self, tokenizer_dir: str, seq_len: int, text_field: str = "text") -> None:
        self.tok = TextTokenizer.load(tokenizer_dir)
        self.seq_len = seq_len
        self.text_field = text_field
        self.carry: List[int] = []

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        texts = [str(t) for t in batch[self.text_field] if t is not None and str(t)]
        rows, self.carry = pack_sequences(self.tok.encode_batch(texts), self.seq_len, self.tok.eos_id, self.carry)
        return {"input_ids": rows[:, :-1].astype(np.int64), "labels": rows[:, 1:].astype(np.int64)}


@functools.lru_cache(maxsize=4)
def _tokenizer_from_json(tokenizer_json: str) -> TextTokenizer:
    """Built once per worker process and tokenizer."""
    from tokenizers import Tokenizer

    return TextTokenizer(Tokenizer.from_str(tokenizer_json))


def tokenize_captions(batch: Dict[str, np.ndarray], *, tokenizer_json: str, max_tokens: int,
                      drop_caption: bool = False) -> Dict[str, np.ndarray]:
    """``map_batches`` function: adds ``caption_ids`` and ``caption_mask`` from the ``caption`` column.

    The tokenizer travels as its JSON (so a worker on any node has it without reading the driver's
    folder) and is built once per worker process. Plain Ray tasks, not an actor pool: Ray reuses its
    warm worker processes, so a dataset starts tokenizing at once."""
    tok = _tokenizer_from_json(tokenizer_json)
    ids, mask = encode_captions(tok, list(batch["caption"]), max_tokens)
    batch["caption_ids"] = ids.astype(np.int64)
    batch["caption_mask"] = mask
    if drop_caption:  # strings cannot become tensors in iter_torch_batches
        batch = {k: v for k, v in batch.items() if k != "caption"}
    return batch


# --------------------------------------------------------------------------------------------------
# Ray Data pipelines
# --------------------------------------------------------------------------------------------------


@dataclass
class TextPipeline:
    spec: TextDataSpec
    tokenizer: TextTokenizer
    tokenizer_dir: str
    trained_tokenizer: bool

    @classmethod
    def from_spec(cls, spec: TextDataSpec) -> "TextPipeline":
        tok, trained = ensure_tokenizer(spec)
        return cls(spec=spec, tokenizer=tok, tokenizer_dir=fsutil.absolute(spec.tokenizer_dir or ""), trained_tokenizer=trained)

    def lm_dataset(self) -> "ray.data.Dataset":  # noqa: F821
        """Packed language-modelling sequences: ``input_ids`` and ``labels``, int64 (seq_len)."""
        import ray

        uri = fsutil.absolute(self.spec.corpus or "")
        if not fsutil.exists(uri):
            raise ConfigError(f"text.corpus: file not found: {uri}")
        if uri.endswith((".parquet", ".pq")):
            ds = ray.data.read_parquet(uri, columns=[self.spec.text_field])
        else:
            ds = ray.data.read_json(uri, lines=True)
        return ds.map_batches(
            PackTokens,
            fn_constructor_kwargs={"tokenizer_dir": self.tokenizer_dir, "seq_len": self.spec.seq_len,
                                   "text_field": self.spec.text_field},
            batch_size=self.spec.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.spec.num_tokenizers), num_cpus=self.spec.tokenizer_num_cpus,
        )

    def add_caption_tokens(self, ds: "ray.data.Dataset", drop_caption: bool = False) -> "ray.data.Dataset":  # noqa: F821
        """Tokenize the ``caption`` column of a video dataset (for the video-text tasks)."""
        import ray

        return ds.map_batches(
            tokenize_captions,
            fn_kwargs={"tokenizer_json": self.tokenizer.tok.to_str(), "max_tokens": self.spec.caption_max_tokens,
                       "drop_caption": drop_caption},
            batch_size=self.spec.batch_size, batch_format="numpy",
            compute=ray.data.TaskPoolStrategy(size=self.spec.num_tokenizers), num_cpus=self.spec.tokenizer_num_cpus,
        )
