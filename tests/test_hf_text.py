"""model.text: {name: hf}: any transformers encoder in open_clip's HFTextEncoder (issue #15 g)."""
import json
import os
import warnings

import open_clip
import pytest
import torch
from open_clip.hf_model import HFTextEncoder
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    GPT2Config,
    RobertaConfig,
    RobertaModel,
    RobertaTokenizer,
    XLMRobertaConfig,
    XLMRobertaModel,
    XLMRobertaTokenizerFast,
)

from tests.helpers import make_tiny_run
from tests.tiny import tiny_model_cfg
from vlp.commands.export import export_open_clip
from vlp.config import check_text_tower
from vlp.models import build_tokenizer, create_model
from vlp.runs import load_model_from_run

WORDS = ["a", "photo", "of", "the", "digit", "zero", "one", "two", "three"]
CAPTIONS = ["a photo of the digit one", "three", "the digit zero"]


def _byte_vocab():  # GPT-2's byte -> unicode table, for a byte-level BPE with no merges
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _xlmr_tokenizer() -> XLMRobertaTokenizerFast:
    """XLM-R's tokenizer kind (a sentencepiece-style unigram model, "▁" word starts) built with
    `tokenizers` alone: the real one needs a sentencepiece file, which cannot be downloaded here."""
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    letters = [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]  # unknown words split into letters
    pieces = [(t, 0.0) for t in special] + [("▁" + w, -1.0) for w in WORDS] + letters
    tok = Tokenizer(models.Unigram(pieces, unk_id=3))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Tiny random BERT, RoBERTa, XLM-R (with tokenizers) and GPT-2 (a decoder) folders, written by save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=40)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(root / "bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), **small)).save_pretrained(root / "bert")
    rvocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", *_byte_vocab()])}
    os.makedirs(root / "roberta")
    with open(root / "roberta" / "vocab.json", "w") as f:
        json.dump(rvocab, f)
    (root / "roberta" / "merges.txt").write_text("#version: 0.2\n")
    RobertaTokenizer(vocab=rvocab, merges=[]).save_pretrained(root / "roberta")
    RobertaModel(RobertaConfig(vocab_size=len(rvocab), pad_token_id=1, **small)).save_pretrained(root / "roberta")
    xlmr = _xlmr_tokenizer()
    xlmr.save_pretrained(root / "xlmr")
    XLMRobertaModel(XLMRobertaConfig(vocab_size=len(xlmr), pad_token_id=1, **small)).save_pretrained(root / "xlmr")
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(root / "gpt2")
    return root


def _spec(path, **kw):
    return {"name": "hf", "hf_model_name": str(path), "context_length": 12, **kw}


@pytest.mark.parametrize("arch, pooler, proj", [("bert", "cls", "linear"), ("bert", "max", "mlp"),
                                                ("roberta", "mean", "mlp"), ("roberta", "last_token", "linear"),
                                                ("xlmr", "mean", "mlp")])
def test_hf_text_tower_is_open_clips(hf_dirs, arch, pooler, proj):
    cfg = tiny_model_cfg(text=_spec(hf_dirs / arch, pooler=pooler, proj=proj))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = create_model(cfg)
        pooler_type = model.open_clip_cfg["text_cfg"]["hf_pooler_type"]
        ref = HFTextEncoder(str(hf_dirs / arch), 16, pooler_type=pooler_type, proj_type=proj)
    assert isinstance(model.text, HFTextEncoder)
    assert list(model.text.state_dict()) == list(ref.state_dict())  # open_clip's names: text.transformer.*, text.proj
    tokens = build_tokenizer(cfg, model)(CAPTIONS)
    assert tokens.shape == (3, 12) and (tokens > 4).any()  # the transformers tokenizer, real word ids
    ref.load_state_dict(model.text.state_dict())
    feats = model.encode_text(tokens)
    assert feats.shape == (3, 16) and torch.isfinite(feats).all()
    torch.testing.assert_close(feats, ref(tokens))


def test_export_loads_in_open_clip(hf_dirs, tmp_path):
    run = make_tiny_run(tmp_path, text=_spec(hf_dirs / "bert", pooler="mean", proj="mlp"))
    out = export_open_clip(run, str(tmp_path / "oc"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, model, tokenizer, _ = load_model_from_run(run)
        oc = open_clip.create_model(f"local-dir:{out}")
    oc_tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    tokens = tokenizer(CAPTIONS)
    assert torch.equal(tokens, oc_tokenizer(CAPTIONS))
    model.eval(), oc.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), oc.encode_text(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("name, spec, match", [
    ("decoder", lambda d: _spec(d / "gpt2"), "model.text.hf_model_name .* is not a text encoder"),
    ("missing", lambda d: _spec(d / "nope"), "model.text.hf_model_name .* cannot be loaded"),
    ("pooler", lambda d: _spec(d / "bert", pooler="attn"), "model.text.pooler must be one of"),
])
def test_bad_hf_text(hf_dirs, name, spec, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
        check_text_tower(tiny_model_cfg(text=spec(hf_dirs)))
    assert "\n" not in str(e.value)
