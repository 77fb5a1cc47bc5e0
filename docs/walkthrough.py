# %% [markdown]
# # Walkthrough: one forward pass, recomputed
#
# This page is a script that was run when the site was built; every output below is its output.
# It loads `tiny`, the small random checkpoint shipped with refimpl (hidden size 16, 2 heads,
# 2 layers, the real RoBERTa vocabulary of 50265 tokens), runs one masked-LM forward pass with a
# trace, and recomputes **every traced tensor** from the equations of
# [the forward pass](forward.md) and [heads and losses](heads.md) in a line or two of NumPy,
# asserting that the two agree.
#
# Each check starts from the *traced* inputs of its stage, so a mismatch points at one equation.
# The last cell then runs the whole forward pass from the token ids with nothing but NumPy.
#
# Run it yourself with `python docs/walkthrough.py`, or open it as a notebook with jupytext
# (`jupytext --to notebook docs/walkthrough.py`): it is in jupytext's percent format. The test
# suite runs it too.

# %%
import math

import numpy as np

import refimpl
from refimpl.hub import resolve
from refimpl.tokenizer import Tokenizer

np.set_printoptions(precision=4, suppress=True, linewidth=100)

model = refimpl.from_pretrained("tiny", dtype="float64", backend="numpy")  # the pure NumPy reference
cfg, p = model.config, model.params
H, N, L = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
D, pad, eps = H // N, cfg.pad_token_id, cfg.layer_norm_eps
print(f"H={H} N={N} D={D} L={L} I={cfg.intermediate_size} V={cfg.vocab_size} "
      f"pad={pad} eps={eps} hidden_act={cfg.hidden_act!r}")

# %% [markdown]
# Two texts, tokenised by the checkpoint's own tokenizer and **left padded**, so that the padding
# rules (positions, the attention mask) show. One label is set for the masked-LM loss; -100 means
# "no label here".

# %%
tokenizer = Tokenizer.from_pretrained(resolve("tiny"))
enc = tokenizer(["Hello world, again!", "Hi <mask>."], padding=True, padding_side="left")
ids, mask = enc["input_ids"], enc["attention_mask"]  # [B, T]
B, T = ids.shape
labels = np.full_like(ids, -100)
at_mask = ids == tokenizer.convert_tokens_to_ids("<mask>")  # [B, T]
labels[at_mask] = tokenizer.convert_tokens_to_ids("Ġthere")  # the <mask> should read " there"
for row in ids:
    print(row, tokenizer.convert_ids_to_tokens(row))
print("attention_mask:\n", mask)

# %% [markdown]
# The traced forward pass: `refimpl.trace` returns every intermediate tensor by name, in the order
# of computation (the names are the golden-file names of [the oracle](golden.md)).

# %%
trace = refimpl.trace(model, input_ids=ids, attention_mask=mask, labels=labels)
print(len(trace), "tensors:", ", ".join(list(trace)[:6]), "...", ", ".join(list(trace)[-3:]))

# %% [markdown]
# One check for every tensor: shape first, then values. The bound comes from the project's one
# tolerance table ([the tolerance policy](tolerances.md)): the recomputation uses the same formulas
# in the same dtype, so the entry is `REORDERED`, the one for the same computation with other BLAS
# call shapes.

# %%
from refimpl.tolerances import REORDERED

TOL = REORDERED["float64"]  # scaled: max|mine - traced| <= TOL * max(1, max|traced|)
print(f"TOL = {TOL:g}:", REORDERED.why)
checked = set()


def check(name, mine):
    ref = trace[name]
    assert mine.shape == ref.shape, f"{name}: shape {mine.shape} != traced {ref.shape}"
    err = float(np.max(np.abs(mine - ref))) / max(1.0, float(np.max(np.abs(ref))))
    assert err <= TOL, f"{name}: scaled error {err:.2e} > {TOL}"
    checked.add(name)
    print(f"{name:30s} {str(ref.shape):18s} agrees (scaled error {err:.0e})")


# %% [markdown]
# ## Embeddings
#
# Position ids count real tokens from `pad + 1`; pads get `pad`. The left-padded row starts
# later but its real tokens get the same positions as they would unpadded.

# %%
is_token = (ids != pad).astype(np.int64)  # [B, T]
pos = np.cumsum(is_token, axis=1) * is_token + pad  # [B, T]
print("position ids:\n", pos)

check("embeddings.word", p.embeddings.word[ids])  # [B, T, H]
check("embeddings.token_type", p.embeddings.token_type[np.zeros_like(ids)])
check("embeddings.position", p.embeddings.position[pos])
check("embeddings.sum", (trace["embeddings.word"] + trace["embeddings.token_type"]) + trace["embeddings.position"])


# %% [markdown]
# LayerNorm over the last axis, two-pass, biased variance:

# %%
def layer_norm(x, ln):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * ln.weight + ln.bias


check("embeddings.output", layer_norm(trace["embeddings.sum"], p.embeddings.layer_norm))


# %% [markdown]
# ## Layer 0, step by step
#
# The additive mask: 0 where a key may be attended to, the dtype's most negative number where it
# is padding. It is added after the `1/sqrt(D)` scaling.

# %%
bias = np.where(mask[:, None, None, :] != 0, 0.0, np.finfo(np.float64).min)  # [B, 1, 1, S]


def split(y):  # [B, T, H] -> [B, N, T, D]
    return y.reshape(B, T, N, D).transpose(0, 2, 1, 3)


def softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


erf = np.vectorize(math.erf)


def gelu(x):  # the exact form (hidden_act="gelu", and always in the LM head)
    return x / 2 * (1 + erf(x / math.sqrt(2)))


a, n = p.layers[0].attention, "layers.0."
check(n + "attention.layer_norm", layer_norm(trace["embeddings.output"], a.layer_norm))
h = trace[n + "attention.layer_norm"]
check(n + "attention.q", split(h @ a.query.weight.T + a.query.bias))  # [B, N, T, D]
check(n + "attention.k", split(h @ a.key.weight.T + a.key.bias))
check(n + "attention.v", split(h @ a.value.weight.T + a.value.bias))

# %% [markdown]
# Scores are recorded scaled and before the mask; the probabilities after both.

# %%
q, k, v = (trace[n + "attention." + x] for x in "qkv")
check(n + "attention.scores", q @ k.transpose(0, 1, 3, 2) / math.sqrt(D))  # [B, N, T, S]
check(n + "attention.probs", softmax(trace[n + "attention.scores"] + bias))
check(n + "attention.context", trace[n + "attention.probs"] @ v)  # [B, N, T, D]
merged = trace[n + "attention.context"].transpose(0, 2, 1, 3).reshape(B, T, H)  # [B, T, H]
check(n + "attention.output", merged @ a.output.weight.T + a.output.bias)
check(n + "attention.residual", trace["embeddings.output"] + trace[n + "attention.output"])
print("probabilities of row 1, head 0 (the two left pads get none):\n", trace[n + "attention.probs"][1, 0])

# %% [markdown]
# The feed-forward half of the block: LayerNorm, `W_1`, GELU, `W_2`, residual.

# %%
f = p.layers[0]
check(n + "ffn.layer_norm", layer_norm(trace[n + "attention.residual"], f.ffn_layer_norm))
check(n + "ffn.pre_activation", trace[n + "ffn.layer_norm"] @ f.intermediate.weight.T + f.intermediate.bias)  # [B, T, I]
check(n + "ffn.activation", gelu(trace[n + "ffn.pre_activation"]))
check(n + "ffn.output", trace[n + "ffn.activation"] @ f.output.weight.T + f.output.bias)  # [B, T, H]
check(n + "ffn.residual", trace[n + "attention.residual"] + trace[n + "ffn.output"])


# %% [markdown]
# ## Every layer
#
# The same checks as one function, run over all layers (layer 0 again included).

# %%
def check_layer(i):
    lay, n = p.layers[i], f"layers.{i}."
    a, x = lay.attention, trace[f"layers.{i - 1}.ffn.residual"] if i else trace["embeddings.output"]
    check(n + "attention.layer_norm", layer_norm(x, a.layer_norm))
    h = trace[n + "attention.layer_norm"]
    for name, w in (("q", a.query), ("k", a.key), ("v", a.value)):
        check(n + "attention." + name, split(h @ w.weight.T + w.bias))
    q, k, v = (trace[n + "attention." + x] for x in "qkv")
    check(n + "attention.scores", q @ k.transpose(0, 1, 3, 2) / math.sqrt(D))
    check(n + "attention.probs", softmax(trace[n + "attention.scores"] + bias))
    check(n + "attention.context", trace[n + "attention.probs"] @ v)
    merged = trace[n + "attention.context"].transpose(0, 2, 1, 3).reshape(B, T, H)
    check(n + "attention.output", merged @ a.output.weight.T + a.output.bias)
    check(n + "attention.residual", x + trace[n + "attention.output"])
    r = trace[n + "attention.residual"]
    check(n + "ffn.layer_norm", layer_norm(r, lay.ffn_layer_norm))
    check(n + "ffn.pre_activation", trace[n + "ffn.layer_norm"] @ lay.intermediate.weight.T + lay.intermediate.bias)
    check(n + "ffn.activation", gelu(trace[n + "ffn.pre_activation"]))
    check(n + "ffn.output", trace[n + "ffn.activation"] @ lay.output.weight.T + lay.output.bias)
    check(n + "ffn.residual", r + trace[n + "ffn.output"])


for i in range(L):
    check_layer(i)

# %% [markdown]
# ## The final LayerNorm, the LM head and the loss
#
# After the last block comes one more LayerNorm. The LM head is dense, exact GELU, LayerNorm, then
# the decoder, whose weight is the word-embedding matrix itself (tied).

# %%
check("final_layer_norm", layer_norm(trace[f"layers.{L - 1}.ffn.residual"], p.final_layer_norm))
lm = p.lm_head
check("head.dense", trace["final_layer_norm"] @ lm.dense.weight.T + lm.dense.bias)
check("head.gelu", gelu(trace["head.dense"]))
check("head.layer_norm", layer_norm(trace["head.gelu"], lm.layer_norm))
print("decoder weight is the word embeddings:", lm.decoder_weight is p.embeddings.word)
check("logits", trace["head.layer_norm"] @ p.embeddings.word.T + lm.bias)  # [B, T, V]

# %% [markdown]
# Cross-entropy over the labelled positions only: the mean of `-log softmax(logits)[label]`.

# %%
z = trace["logits"]
logp = z - z.max(-1, keepdims=True)
logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))  # log_softmax, [B, T, V]
valid = labels != -100
check("loss", np.asarray(-logp[valid, labels[valid]].mean()))

assert checked == set(trace), f"not recomputed: {sorted(set(trace) - checked)}"
print(f"all {len(trace)} traced tensors recomputed")

# %% [markdown]
# ## The whole forward pass in NumPy
#
# The same equations chained from the token ids, without the trace: twelve lines are a complete
# RoBERTa-PreLayerNorm masked-LM forward pass. It agrees with refimpl's logits.

# %%
x = layer_norm(p.embeddings.word[ids] + p.embeddings.token_type[np.zeros_like(ids)]
               + p.embeddings.position[pos], p.embeddings.layer_norm)
for lay in p.layers:
    a, h = lay.attention, layer_norm(x, lay.attention.layer_norm)
    q, k, v = (split(h @ w.weight.T + w.bias) for w in (a.query, a.key, a.value))
    ctx = softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(D) + bias) @ v
    x = x + ctx.transpose(0, 2, 1, 3).reshape(B, T, H) @ a.output.weight.T + a.output.bias
    h = gelu(layer_norm(x, lay.ffn_layer_norm) @ lay.intermediate.weight.T + lay.intermediate.bias)
    x = x + h @ lay.output.weight.T + lay.output.bias
x = layer_norm(x, p.final_layer_norm)
h = layer_norm(gelu(x @ lm.dense.weight.T + lm.dense.bias), lm.layer_norm)
logits = h @ p.embeddings.word.T + lm.bias
check("logits", logits)
print("top prediction at the <mask>:", tokenizer.convert_ids_to_tokens([int(logits[at_mask][0].argmax())]),
      "(random weights: any token)")
