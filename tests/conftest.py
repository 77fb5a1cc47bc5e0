"""Shared fixtures: tiny transformers models built from a config, saved with ``save_pretrained``.

torch and transformers are the oracle here and nowhere else.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from refimpl.params import TASKS

settings.register_profile(
    "ci", derandomize=True, max_examples=25, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev", max_examples=100, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

@pytest.fixture
def fast_by_default(monkeypatch):
    """backend="auto" (the loading default) picks the numba fast path for every model, however small.

    The test models here are tiny, so "auto" would run them on the reference; files that hold the
    fast path to transformers through the default use this (``pytestmark``)."""
    import refimpl.model

    monkeypatch.setattr(refimpl.model, "AUTO_NUMBA_FROM_HIDDEN", 0)


# task -> transformers class name, from refimpl's one task table
TASK_CLASSES = {task: cls for task, (cls, _, _) in TASKS.items()}

TINY = dict(
    vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
    max_position_embeddings=40, type_vocab_size=2, layer_norm_eps=1e-5,
)


def randomize_(model, seed: int, std: float = 0.5, bias_std: float | None = None) -> None:
    """Weights ~ N(0, std^2) (biases ~ N(0, bias_std^2) when given); LayerNorm scales
    ~ 1 + N(0, 0.1^2), so that no parameter is trivial."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if "LayerNorm.weight" in name or "layer_norm.weight" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif bias_std is not None and name.endswith("bias"):
                p.copy_(bias_std * noise)
            else:
                p.copy_(std * noise)


def build_hf(task: str, seed: int = 0, **config_kwargs):
    """A transformers model for ``task`` (eager attention, eval mode, float64) with random weights."""
    import torch
    import transformers

    kwargs = {**TINY, **config_kwargs}
    if task == "question-answering":
        kwargs.setdefault("num_labels", 2)
    if task == "causal-lm":
        kwargs.setdefault("is_decoder", True)
    config = transformers.RobertaPreLayerNormConfig(**kwargs)
    config._attn_implementation = "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = getattr(transformers, TASK_CLASSES[task])(config)
    randomize_(model, seed)
    return model.eval().double()


def build_post_ln_roberta(seed: int = 0):
    """transformers' RobertaForMaskedLM (post-LayerNorm, as roberta-base) with random weights: the
    architecture refimpl refuses."""
    import torch
    import transformers

    config = transformers.RobertaConfig(**TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = transformers.RobertaForMaskedLM(config)
    randomize_(model, seed)
    return model.eval().double()


def save_hf(model, folder, dtype=None, **kwargs) -> str:
    """``save_pretrained`` (in ``dtype`` if given) and return the folder."""
    import torch

    m = model
    if dtype is not None:
        m = model.to(getattr(torch, dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.save_pretrained(str(folder), **kwargs)
    if dtype is not None:
        model.double()
    return str(folder)


def torch_forward(model, dtype: str = "float64", **inputs):
    """Run the transformers model in ``dtype`` on NumPy inputs; returns the output with NumPy fields."""
    import torch

    m = model.to(getattr(torch, dtype))
    tin = {}
    for k, v in inputs.items():
        if v is None:
            continue
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
            if v.is_floating_point():
                v = v.to(getattr(torch, dtype))
        tin[k] = v
    with torch.no_grad():
        out = m(**tin)
    model.double()
    return out


@pytest.fixture
def hf_factory(tmp_path):
    """``make(task, seed=0, **config) -> (hf_model_float64, folder)``."""
    counter = [0]

    def make(task: str, seed: int = 0, **config_kwargs):
        counter[0] += 1
        model = build_hf(task, seed, **config_kwargs)
        folder = save_hf(model, tmp_path / f"{task}-{counter[0]}")
        return model, folder

    return make


ALL_TASKS = list(TASK_CLASSES)


def task_inputs(task: str, config, rng: np.random.Generator) -> dict:
    """Inputs (and labels) for ``task``: a batch of 3 rows of 11 tokens, one full, one right-padded,
    one left-padded, with token types; multiple choice stacks two choices into [3, 2, 11]."""
    b, t = 3, 11
    ids = rng.integers(3, config.vocab_size, size=(b, t))
    ids[:, 0] = 0
    mask = np.ones((b, t), dtype=np.int64)
    ids[1, 7:] = config.pad_token_id  # right padding
    mask[1, 7:] = 0
    ids[2, :4] = config.pad_token_id  # left padding
    mask[2, :4] = 0
    types = (np.arange(t) >= 5).astype(np.int64)[None].repeat(b, 0) * mask * int(config.type_vocab_size > 1)
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    if task in ("masked-lm", "causal-lm", "token-classification"):
        k = config.vocab_size if task != "token-classification" else config.num_labels
        inputs["labels"] = np.where(mask == 1, rng.integers(0, k, size=(b, t)), -100)
    elif task == "sequence-classification":
        inputs["labels"] = rng.integers(0, config.num_labels, size=(b,))
    elif task == "question-answering":  # 30 lies past the end: clamped to T and ignored
        inputs["start_positions"], inputs["end_positions"] = np.array([1, 2, 30]), np.array([3, 2, 5])
    elif task == "multiple-choice":
        inputs = {k: np.stack([v, v[::-1]], axis=1) for k, v in inputs.items()}  # [B, C=2, T]
        inputs["labels"] = np.array([1, 0, 1])
    return inputs


def assert_outputs_close(got, want, dtype: str, module_prefix: str) -> None:
    """Every field of ``want`` (a NumPy-backed output) in ``got``, whose arrays must belong to the
    library named by ``module_prefix`` (``array_api_strict``, ``cupy``): values within TOL[dtype]."""
    from refimpl.backend import to_numpy
    from tolerances import assert_close

    for name, value in want.to_dict().items():
        items = zip(got[name], value) if isinstance(value, tuple) else [(got[name], value)]
        for i, (a, b) in enumerate(items):
            label = f"{name}[{i}]" if isinstance(value, tuple) else name
            assert type(a).__module__.startswith(module_prefix), f"{label} left {module_prefix}"
            assert_close(to_numpy(a), b, dtype, label)


@pytest.fixture(scope="module")
def hostile_outcomes(request, tmp_path_factory):
    """The module's hostile cases (its ``case``: a tests/hostile_harness.Cases), built and run once in
    a child process under a memory cap and a timeout: -> (the case specs, the results), by name."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("the hostile-input harness measures memory through Linux's /proc")
    return request.module.case.run(tmp_path_factory.mktemp(request.module.__name__))
