"""A small WordPiece tokenizer built from captions, saved as a Hugging Face fast tokenizer.

Loads with ``transformers.AutoTokenizer.from_pretrained(path)`` and with open_clip's
``HFTokenizer(path, context_length=...)``. Special-token ids are fixed: ``[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3,
[MASK]=4`` (a BERT text tower pads with id 0), and one sentence is encoded as ``[CLS] text [SEP]``.

The vocabulary is chosen here rather than by ``tokenizers.trainers.WordPieceTrainer``: that trainer gives a different
vocabulary from run to run on the same text (ties between merges are broken in hash-map order, huggingface/tokenizers
issue #1794), and the demo must be identical for a seed. The vocabulary is: special tokens, every character seen (as
a word start and as a ``##`` continuation, so any word of known characters is encodable), then whole words by
frequency (ties by spelling) up to ``vocab_size``. Normalisation and pre-tokenisation are BERT's, from ``tokenizers``.

One builder for every route: the demo, ``medclip-prep tokenizer --input 'OUT/train-*.tar'`` (from shards) and a
converter's ``--tokenizer`` (words counted as the train samples are written) give identical files for the same
captions.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from data_prep.records import PrepError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEFAULT_VOCAB_SIZE = 4096  # the embedding size of the ``tiny`` preset's BERT: a larger vocabulary would not fit it


def _components():
    # Imported here: tokenizers/transformers take seconds to import and only tokenizer builds need them.
    from tokenizers import normalizers, pre_tokenizers

    return normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()


class WordCounts:
    """Word counts of captions after BERT normalisation and pre-tokenisation: all the vocabulary depends on.

    Counted caption by caption, so a converter can build a tokenizer from millions of captions without keeping them.
    """

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self.captions = 0
        self._normalizer, self._pre_tokenizer = _components()

    def add(self, caption: str) -> None:
        words = self._pre_tokenizer.pre_tokenize_str(self._normalizer.normalize_str(caption))
        self.counts.update(word for word, _ in words)
        self.captions += 1

    def update(self, captions: Iterable[str]) -> WordCounts:
        for caption in captions:
            self.add(caption)
        return self


def vocab_from_counts(counts: Counter[str], vocab_size: int) -> dict[str, int]:
    """Token -> id: special tokens, every character (word start and ``##`` continuation), then words by frequency."""
    chars = sorted({ch for word in counts for ch in word})
    tokens = list(dict.fromkeys([*SPECIAL_TOKENS, *chars, *(f"##{ch}" for ch in chars)]))
    known = set(tokens)
    words = [w for w in sorted(counts, key=lambda w: (-counts[w], w)) if w not in known]
    tokens += words[: max(0, vocab_size - len(tokens))]
    return {token: i for i, token in enumerate(tokens)}


def build_vocab(captions: Iterable[str], vocab_size: int) -> dict[str, int]:
    """Token -> id for :func:`train_wordpiece` (deterministic: depends only on the multiset of captions)."""
    return vocab_from_counts(WordCounts().update(captions).counts, vocab_size)


def train_wordpiece(
    captions: Iterable[str], output: Path, vocab_size: int = DEFAULT_VOCAB_SIZE, max_length: int = 512
) -> int:
    """Build the tokenizer from ``captions`` and save it to the folder ``output``.

    Args:
        captions: training captions (train split only, so validation text never shapes the vocabulary).
        output: folder to write ``tokenizer.json`` and its config into.
        vocab_size: upper bound on the vocabulary (a small caption set yields fewer tokens).
        max_length: ``model_max_length`` stored with the tokenizer.

    Returns:
        The vocabulary size.
    """
    return save_tokenizer(build_vocab(captions, vocab_size), output, max_length)


def save_tokenizer(vocab: dict[str, int], output: Path, max_length: int = 512) -> int:
    """Save the WordPiece tokenizer of ``vocab`` as a Hugging Face tokenizer folder; returns the vocabulary size.

    The files are written into a temporary sibling folder and each is moved into ``output`` when all are complete, so
    an interrupted build never leaves a ``tokenizer.json`` without its config.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = _components()
    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )
    output.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fast.save_pretrained(str(tmp))
        for path in sorted(tmp.iterdir()):
            os.replace(path, output / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(vocab)


def expand_shards(patterns: Iterable[str], flag: str = "--input") -> list[Path]:
    """Shard files of brace (``train-{000000..000003}.tar``) and glob (``train-*.tar``) patterns, sorted, unique.

    Raises:
        PrepError: naming the pattern that matches no file.
    """
    from medclip_train.data.sources import expand_shard_pattern  # imports webdataset: only tokenizer builds need it

    found: dict[str, None] = {}
    for pattern in patterns:
        matched = [p for p in expand_shard_pattern(str(pattern)) if os.path.isfile(p)]
        if not matched:
            raise PrepError(f"{flag} {pattern}: no shard file matches")
        found.update(dict.fromkeys(matched))
    return [Path(p) for p in found]


def shard_captions(shards: Iterable[Path]) -> Iterator[str]:
    """Every caption of the shards: each sample's ``.txt`` and the other captions listed in its ``.json``.

    The same captions the training stream draws from (``meta["captions"]``), and the same a converter counts when it
    builds the tokenizer itself, so both routes give identical files.
    """
    for shard in shards:
        try:
            with tarfile.open(shard, "r") as tar:
                for member in tar:
                    ext = member.name.rpartition("/")[2].partition(".")[2]
                    if not member.isfile() or ext not in ("txt", "json"):
                        continue
                    data = tar.extractfile(member).read().decode("utf-8")
                    if ext == "txt":
                        yield data
                    else:
                        yield from _listed_captions(json.loads(data))
        except (tarfile.TarError, OSError, UnicodeDecodeError, ValueError) as e:
            raise PrepError(f"shard {shard}: cannot be read ({e})") from None


def _listed_captions(meta) -> list[str]:
    captions = meta.get("captions") if isinstance(meta, dict) else None
    return [c for c in captions if isinstance(c, str)] if isinstance(captions, list) else []


def build_from_shards(
    patterns: Iterable[str], output: Path, vocab_size: int = DEFAULT_VOCAB_SIZE, overwrite: bool = False
) -> tuple[int, int]:
    """``medclip-prep tokenizer``: the tokenizer of the shards' captions; returns ``(vocab size, captions)``."""
    if vocab_size < len(SPECIAL_TOKENS):
        raise PrepError(f"--vocab-size must be >= {len(SPECIAL_TOKENS)}, got {vocab_size}")
    check_output(output, overwrite, "--output")
    counts = WordCounts().update(shard_captions(expand_shards(patterns)))
    if not counts.captions:
        raise PrepError(f"--input {' '.join(map(str, patterns))}: the shards hold no captions")
    return save_tokenizer(checked_vocab(counts, vocab_size), output), counts.captions


def checked_vocab(counts: WordCounts, vocab_size: int) -> dict[str, int]:
    """:func:`vocab_from_counts`, refusing a ``vocab_size`` the characters alone exceed (the text tower's embedding
    has ``vocab_size`` rows: a larger vocabulary would index past it)."""
    vocab = vocab_from_counts(counts.counts, vocab_size)
    if len(vocab) > vocab_size:
        raise PrepError(
            f"--vocab-size {vocab_size} is smaller than the {len(vocab)} special tokens and characters of the captions"
        )
    return vocab


def check_output(output: Path, overwrite: bool, flag: str) -> None:
    """Refuse to replace an earlier tokenizer in ``output`` unless ``overwrite``."""
    if output.exists() and not output.is_dir():
        raise PrepError(f"{flag} {output} exists and is not a folder")
    if (output / "tokenizer.json").exists() and not overwrite:
        raise PrepError(f"{flag} {output} already holds a tokenizer; pass --overwrite to replace it")
