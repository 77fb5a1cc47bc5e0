"""Write the tiny random checkpoint shipped in refimpl/data/tiny-random-mlm (provenance of that folder).

A RobertaPreLayerNormForMaskedLM with the real RoBERTa vocabulary (50265 tokens) but hidden size 16
and 2 layers, random weights (seed 0), saved by transformers' own ``save_pretrained``, plus the
RoBERTa tokenizer files. Its predictions are meaningless; it exists so that the README's first
command runs offline on a clean checkout. Run with the test extra installed:

    python scripts/make_tiny_checkpoint.py
"""

import os
import shutil
import warnings

import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "refimpl", "data", "tiny-random-mlm")
TOKENIZER = os.path.join(HERE, "..", "tests", "data", "roberta-tokenizer")

config = transformers.RobertaPreLayerNormConfig(
    vocab_size=50265, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
)
torch.manual_seed(0)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model = transformers.RobertaPreLayerNormForMaskedLM(config).eval()
    shutil.rmtree(OUT, ignore_errors=True)
    model.save_pretrained(OUT)
for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
    shutil.copy(os.path.join(TOKENIZER, name), os.path.join(OUT, name))
print("wrote", os.path.normpath(OUT), sorted(os.listdir(OUT)))
