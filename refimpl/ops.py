"""Elementary operations: linear, LayerNorm, softmax and the activation functions.

These are the definitions. Every function is pure (arrays in, arrays out), computes in its input's
dtype, and uses only the Array API namespace of its inputs, so NumPy, CuPy and ``array_api_strict``
share one code path. The fast path (:mod:`refimpl.fast`) has its own kernels for some of them, each
held to the definition here by tests.

Shape legend used throughout refimpl: B batch, C choices, T query length, P past length,
S = P + T key length, H hidden, N heads, D = H / N head size, I intermediate, V vocab, L layers.
"""

from __future__ import annotations

import math
from typing import Callable

from .backend import erf, namespace


def linear(x, weight, bias=None):
    """``x @ W.T + b`` with ``W`` in PyTorch's ``[out, in]`` orientation.

    x: [..., in]; weight: [out, in]; bias: [out] or None -> [..., out].
    This is the only place in the reference that writes ``x @ W.T``.
    """
    xp = namespace(x, weight)
    lead, n_in = x.shape[:-1], x.shape[-1]
    rows = xp.reshape(x, (-1, n_in))  # [..., in] -> [R, in]: one GEMM, not one per leading index
    y = xp.matmul(rows, xp.matrix_transpose(weight))  # [R, in] @ [in, out] -> [R, out]
    if bias is not None:
        y = y + bias
    return xp.reshape(y, (*lead, weight.shape[0]))  # [R, out] -> [..., out]


def layer_norm(x, weight, bias, eps: float):
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    x: [..., H]; weight, bias: [H] -> [..., H]. Two-pass (mean first, then the centred variance),
    biased variance, as ``torch.nn.LayerNorm``. ``eps`` comes from the config (checkpoints ship 1e-5).
    """
    xp = namespace(x)
    mean = xp.mean(x, axis=-1, keepdims=True)  # [..., 1]
    centred = x - mean  # [..., H]
    var = xp.mean(centred * centred, axis=-1, keepdims=True)  # [..., 1]
    return centred / xp.sqrt(var + eps) * weight + bias


def softmax(x, axis: int = -1):
    """Numerically stable softmax: ``exp(x - max) / sum(exp(x - max))`` along ``axis``."""
    xp = namespace(x)
    shifted = x - xp.max(x, axis=axis, keepdims=True)
    e = xp.exp(shifted)
    return e / xp.sum(e, axis=axis, keepdims=True)


def log_softmax(x, axis: int = -1):
    """``x - logsumexp(x)`` along ``axis``, stable for large logits."""
    xp = namespace(x)
    shifted = x - xp.max(x, axis=axis, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=axis, keepdims=True))


# ---------------------------------------------------------------------------------------------
# Activations: every well-defined ``hidden_act`` string transformers accepts (ACT2FN).
# ---------------------------------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu(x):
    """Exact GELU: ``x * 0.5 * (1 + erf(x / sqrt(2)))`` (``hidden_act="gelu"`` and the LM head)."""
    return x * 0.5 * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_tanh(x):
    """The tanh approximation, ``gelu_new``: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.

    Differs from the exact form by up to ~5e-4; only float64 tests can tell the two apart.
    """
    xp = namespace(x)
    return 0.5 * x * (1.0 + xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * (x * x * x))))


def gelu_fast(x):
    """``gelu_fast``: ``0.5 x (1 + tanh(x * 0.7978845608 * (1 + 0.044715 x^2)))``."""
    xp = namespace(x)
    return 0.5 * x * (1.0 + xp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def gelu_10(x):
    """``gelu_10``: exact GELU clipped to [-10, 10]."""
    xp = namespace(x)
    return xp.clip(gelu(x), -10.0, 10.0)


def sigmoid(x):
    """``1 / (1 + exp(-x))``, evaluated without overflow for large ``|x|``."""
    xp = namespace(x)
    e = xp.exp(-xp.abs(x))  # in (0, 1]
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def quick_gelu(x):
    """``quick_gelu``: ``x * sigmoid(1.702 x)``."""
    return x * sigmoid(1.702 * x)


def silu(x):
    """``silu`` / ``swish``: ``x * sigmoid(x)``."""
    return x * sigmoid(x)


def softplus(x):
    """``log(1 + exp(x))`` with torch's threshold: ``x`` itself where ``x > 20``."""
    xp = namespace(x)
    safe = xp.where(x > 20.0, xp.zeros_like(x), x)
    return xp.where(x > 20.0, x, xp.log1p(xp.exp(safe)))


def mish(x):
    """``mish``: ``x * tanh(softplus(x))``."""
    xp = namespace(x)
    return x * xp.tanh(softplus(x))


def relu(x):
    xp = namespace(x)
    return xp.where(x > 0, x, xp.zeros_like(x))


def relu2(x):
    """``relu2``: ``relu(x)^2``."""
    r = relu(x)
    return r * r


def relu6(x):
    xp = namespace(x)
    return xp.clip(x, 0.0, 6.0)


def leaky_relu(x):
    """``leaky_relu`` with torch's default slope 0.01."""
    xp = namespace(x)
    return xp.where(x >= 0, x, 0.01 * x)


def hardswish(x):
    """``hardswish``: ``x * relu6(x + 3) / 6``."""
    return x * relu6(x + 3.0) / 6.0


def tanh(x):
    return namespace(x).tanh(x)


def identity(x):
    """``linear``: the identity."""
    return x


def laplace(x):
    """``laplace`` (MEGA): ``0.5 (1 + erf((x - 0.707107) / (0.282095 sqrt 2)))``."""
    return 0.5 * (1.0 + erf((x - 0.707107) / (0.282095 * math.sqrt(2.0))))


def sqrtsoftplus(x):
    """``sqrtsoftplus``: ``sqrt(softplus(x))``."""
    return namespace(x).sqrt(softplus(x))


# The one table of activation names -> functions, keyed by transformers' ``hidden_act`` strings.
ACTIVATIONS: dict[str, Callable] = {
    "gelu": gelu,
    "gelu_python": gelu,
    "gelu_10": gelu_10,
    "gelu_fast": gelu_fast,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_python_tanh": gelu_tanh,
    "gelu_accurate": gelu_tanh,
    "hardswish": hardswish,
    "laplace": laplace,
    "leaky_relu": leaky_relu,
    "linear": identity,
    "mish": mish,
    "quick_gelu": quick_gelu,
    "relu": relu,
    "relu2": relu2,
    "relu6": relu6,
    "sigmoid": sigmoid,
    "silu": silu,
    "swish": silu,
    "sqrtsoftplus": sqrtsoftplus,
    "tanh": tanh,
}

# Accepted by transformers but not representable as a parameter-free function of the config.
UNSUPPORTED_ACTIVATIONS = {
    "prelu": "it has a learnable slope that RobertaPreLayerNorm checkpoints do not store",
    "xielu": "it has learnable parameters that RobertaPreLayerNorm checkpoints do not store",
}


def activation(name: str) -> Callable:
    """The activation function for a ``hidden_act`` string; raises ``ValueError`` for unknown names."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        if name in UNSUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"hidden_act={name!r} is not supported: {UNSUPPORTED_ACTIVATIONS[name]}"
            ) from None
        raise ValueError(
            f"unknown hidden_act={name!r}; supported: {', '.join(sorted(ACTIVATIONS))}"
        ) from None
