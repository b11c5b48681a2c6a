"""Shared, expensive objects for the model tests, each built once per session.

The conversion cache points at a session temporary folder, so the tests neither read nor fill the
user's cache (SmolLM2 is converted once per session, about 11 s).
"""

import os
import shutil

import pytest

from tests.models.tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="session", autouse=True)
def kbi_cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kbi-cache")
    old = os.environ.get("KBI_CACHE")
    os.environ["KBI_CACHE"] = str(folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)  # 540 MB of converted SmolLM2; pytest keeps 3 runs
    if old is None:
        os.environ.pop("KBI_CACHE", None)
    else:
        os.environ["KBI_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory):
    """(path, expected HF weights) of the tiny tied-embedding Llama."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf"
    expected, _ = write_tiny_gguf(path, tie=True)
    return path, expected


@pytest.fixture(scope="session")
def smollm2_folder():
    from keras_biasinject.models.load import resolve_preset

    return resolve_preset("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_folder):
    """(tokenizer, LlamaForCausalLM) from the converted folder: the reference."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_folder)
    model = transformers.LlamaForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    return tokenizer, model


@pytest.fixture(scope="session")
def smollm2_lm(smollm2_folder):
    """load("smollm2-135m", "causal_lm") with greedy sampling."""
    from keras_biasinject.models import load

    lm = load("smollm2-135m", task="causal_lm", sequence_length=64)
    lm.compile(sampler="greedy")
    return lm
