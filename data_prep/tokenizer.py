"""A small WordPiece tokenizer trained on captions, saved as a Hugging Face fast tokenizer.

Loads with ``transformers.AutoTokenizer.from_pretrained(path)`` and with open_clip's
``HFTokenizer(path, context_length=...)``. Special-token ids are fixed: ``[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3,
[MASK]=4`` (a BERT text tower pads with id 0), and one sentence is encoded as ``[CLS] text [SEP]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_wordpiece(captions: Iterable[str], output: Path, vocab_size: int = 4096, max_length: int = 512) -> int:
    """Train on ``captions`` and save to ``output`` (a folder).

    Args:
        captions: training captions (train split only, so validation text never shapes the vocabulary).
        output: folder to write ``tokenizer.json`` and its configs into.
        vocab_size: upper bound on the vocabulary (a small caption set yields fewer tokens).
        max_length: ``model_max_length`` stored with the tokenizer.

    Returns:
        The vocabulary size reached.
    """
    # Imported here: transformers takes seconds to import and only the demo needs it.
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(list(captions), trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
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
    return tok.get_vocab_size()
