"""A tiny random BERT sentence encoder saved into a folder, with a tokenizer built from a vocabulary written
here (nothing is downloaded): what a `text_encoder` setting points to, for tests."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_bert(root: Path, words: list[str], hidden: int = 24, seed: int = 0) -> str:
    """Write the encoder under ``root / "encoder"`` and return that folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    root.mkdir(parents=True, exist_ok=True)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words)) + "\n")
    out = root / "encoder"
    # (BertTokenizerFast(vocab_file=...) of transformers 5 ignores the file: every word would be [UNK])
    tokenizer = BertTokenizer(str(vocab))
    assert tokenizer.tokenize(words[0]) == [words[0].lower()], "the tokenizer does not know its own vocabulary"
    tokenizer.save_pretrained(out)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=2 * hidden, max_position_embeddings=32)).save_pretrained(out)
    return str(out)
