"""A small WordPiece tokenizer built from captions, saved as a Hugging Face fast tokenizer.

Loads with ``transformers.AutoTokenizer.from_pretrained(path)`` and with open_clip's
``HFTokenizer(path, context_length=...)``. Special-token ids are fixed: ``[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3,
[MASK]=4`` (a BERT text tower pads with id 0), and one sentence is encoded as ``[CLS] text [SEP]``.

The vocabulary is chosen here rather than by ``tokenizers.trainers.WordPieceTrainer``: that trainer gives a different
vocabulary from run to run on the same text (ties between merges are broken in hash-map order, huggingface/tokenizers
issue #1794), and the demo must be identical for a seed. The vocabulary is: special tokens, every character seen (as
a word start and as a ``##`` continuation, so any word of known characters is encodable), then whole words by
frequency (ties by spelling) up to ``vocab_size``. Normalisation and pre-tokenisation are BERT's, from ``tokenizers``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _components():
    # Imported here: tokenizers/transformers take seconds to import and only the demo needs them.
    from tokenizers import normalizers, pre_tokenizers

    return normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()


def build_vocab(captions: Iterable[str], vocab_size: int) -> dict[str, int]:
    """Token -> id for :func:`train_wordpiece` (deterministic: depends only on the multiset of captions)."""
    normalizer, pre_tokenizer = _components()
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)))
    chars = sorted({ch for word in counts for ch in word})
    tokens = list(dict.fromkeys([*SPECIAL_TOKENS, *chars, *(f"##{ch}" for ch in chars)]))
    known = set(tokens)
    words = [w for w in sorted(counts, key=lambda w: (-counts[w], w)) if w not in known]
    tokens += words[: max(0, vocab_size - len(tokens))]
    return {token: i for i, token in enumerate(tokens)}


def train_wordpiece(captions: Iterable[str], output: Path, vocab_size: int = 4096, max_length: int = 512) -> int:
    """Build the tokenizer from ``captions`` and save it to the folder ``output``.

    Args:
        captions: training captions (train split only, so validation text never shapes the vocabulary).
        output: folder to write ``tokenizer.json`` and its config into.
        vocab_size: upper bound on the vocabulary (a small caption set yields fewer tokens).
        max_length: ``model_max_length`` stored with the tokenizer.

    Returns:
        The vocabulary size.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = build_vocab(captions, vocab_size)
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
    fast.save_pretrained(str(output))
    return len(vocab)
