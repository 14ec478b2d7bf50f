#!/usr/bin/env python
"""Write a word-level Hugging Face tokenizer folder for a small closed vocabulary.

    python tools/word_tokenizer.py OUT [TEXT_FILE ...]    # default texts: the built-in digits'

The CoCa quickstart (configs/quickstart/coca_digits.yaml) uses one
(configs/quickstart/digits_tokenizer/, written by this script with the default texts):
the digits captions need ~40 words, and a 49408-way CLIP-BPE softmax in the caption
decoder would cost more than the rest of the tiny model on a CPU. Lowercased, split on
whitespace and punctuation; ``[PAD]`` is id 0 (open_clip's pad id), each text becomes
``[SOS] words [EOS]``; unknown words map to ``[UNK]``. Load it with
``model.text.hf_tokenizer_name: OUT`` (open_clip's HFTokenizer).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Iterable, List

SPECIALS = ["[PAD]", "[UNK]", "[SOS]", "[EOS]"]  # ids 0..3


def digits_texts() -> List[str]:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from vlp.data.digits import CAPTIONS, CLASSNAMES, ZEROSHOT_TEMPLATES

    texts = [t.format(w=w, n=n) for t in CAPTIONS for n, w in enumerate(CLASSNAMES)]
    return texts + [t.format(c=c) for t in ZEROSHOT_TEMPLATES for c in CLASSNAMES]


def write_word_tokenizer(texts: Iterable[str], out: str) -> int:
    """Write ``out/`` (tokenizer.json + config); returns the vocabulary size."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+, as the vocabulary above
    tok.post_processor = processors.TemplateProcessing(
        single="[SOS] $A [EOS]", special_tokens=[("[SOS]", vocab["[SOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[SOS]", eos_token="[EOS]")
    fast.save_pretrained(out)
    return len(vocab)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output folder")
    parser.add_argument("texts", nargs="*", help="text files, one text per line (default: the digits captions)")
    args = parser.parse_args(argv)
    texts = [line for path in args.texts for line in open(path).read().splitlines()] or digits_texts()
    print(f"{args.out}: {write_word_tokenizer(texts, args.out)} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
