"""Model families. Each family module provides `MODEL_TYPES`, `from_hf_config(dict) ->
ModelConfig`, `hf_param_map(cfg) -> {our path: (hf name, transpose)}` and an NNX model class."""

from __future__ import annotations

import importlib
from types import ModuleType

from prunepath_jax.config import ModelConfig
from prunepath_jax.hf.configs import UnsupportedConfigError

# family name -> (module path, model class name)
_FAMILIES = {
    "llama": ("prunepath_jax.models.llama", "LlamaModel"),
    "gpt2": ("prunepath_jax.models.gpt2", "GPT2Model"),
    "bert": ("prunepath_jax.models.bert", "BertModel"),
}
_MODEL_TYPE_TO_FAMILY = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gpt2": "gpt2",
    "bert": "bert",
    "roberta": "bert",
}


def family_module(family: str) -> ModuleType:
    if family not in _FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(_FAMILIES)}")
    return importlib.import_module(_FAMILIES[family][0])


def config_from_hf(hf_cfg: dict) -> ModelConfig:
    """Dispatches on `model_type`; unsupported architectures get a clear error."""
    model_type = hf_cfg.get("model_type")
    if model_type not in _MODEL_TYPE_TO_FAMILY:
        raise UnsupportedConfigError(
            f"unsupported architecture model_type={model_type!r}; supported: "
            f"{sorted(_MODEL_TYPE_TO_FAMILY)}"
        )
    return family_module(_MODEL_TYPE_TO_FAMILY[model_type]).from_hf_config(hf_cfg)


def model_class(cfg: ModelConfig):
    module_path, cls = _FAMILIES[cfg.family]
    return getattr(importlib.import_module(module_path), cls)


def hf_param_map(cfg: ModelConfig) -> dict:
    return family_module(cfg.family).hf_param_map(cfg)
