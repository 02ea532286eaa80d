"""Named architectures with their published hyper-parameters, and `config.json` loading.

Imports no torch: `tmath predict` resolves models through this module on any machine.
Each preset's source is its published transformers config (Hugging Face Hub, `config.json`)
or the paper's table; tests check every parameter count against the transformers model built
from the same hyper-parameters on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path

from formulas.architecture import Architecture
from models.configs import from_hf_config


def _gpt2(layers: int, hidden: int, heads: int, vocab: int = 50257, positions: int = 1024) -> Architecture:
    """GPT-2 layout: learned positions, LayerNorm, biases, tied embeddings, GeLU 4h MLP, dropout 0.1."""
    return Architecture(n_layers=layers, hidden=hidden, n_heads=heads, vocab=vocab, max_positions=positions)


def _neox(layers: int, hidden: int, heads: int, vocab: int) -> Architecture:
    """GPT-NeoX/Pythia layout: rotary, LayerNorm, biases, untied output, GeLU 4h MLP, no dropout."""
    return Architecture(
        n_layers=layers,
        hidden=hidden,
        n_heads=heads,
        vocab=vocab,
        max_positions=2048,
        position="rotary",
        tied_embeddings=False,
        dropout=0.0,
    )


def _llama(layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int, positions: int) -> Architecture:
    """Llama layout: rotary, RMSNorm, no biases, untied output, SwiGLU MLP, no dropout."""
    return Architecture(
        n_layers=layers,
        hidden=hidden,
        n_heads=heads,
        n_kv_heads=kv_heads,
        ffn_hidden=ffn,
        vocab=vocab,
        max_positions=positions,
        position="rotary",
        norm="rmsnorm",
        bias=False,
        tied_embeddings=False,
        mlp="swiglu",
        dropout=0.0,
    )


def _bert(layers: int, hidden: int, heads: int) -> Architecture:
    """BERT pre-training layout (BertForPreTraining): pooler, MLM head, next-sentence head."""
    return Architecture(
        n_layers=layers,
        hidden=hidden,
        n_heads=heads,
        vocab=30522,
        max_positions=512,
        family="encoder",
        type_vocab=2,
        pooler=True,
        mlm_head=True,
        nsp_head=True,
    )


PRESETS: dict[str, Architecture] = {
    # GPT-2 (Radford et al. 2019; Hub configs openai-community/gpt2*).
    "gpt2": _gpt2(12, 768, 12),
    "gpt2-medium": _gpt2(24, 1024, 16),
    "gpt2-large": _gpt2(36, 1280, 20),
    "gpt2-xl": _gpt2(48, 1600, 25),
    # Pythia (Biderman et al. 2023, Table 1; vocabularies padded as in the Hub configs).
    "pythia-70m": _neox(6, 512, 8, 50304),
    "pythia-160m": _neox(12, 768, 12, 50304),
    "pythia-410m": _neox(24, 1024, 16, 50304),
    "pythia-1b": _neox(16, 2048, 8, 50304),
    "pythia-1.4b": _neox(24, 2048, 16, 50304),
    "pythia-2.8b": _neox(32, 2560, 32, 50304),
    "pythia-6.9b": _neox(32, 4096, 32, 50432),
    "pythia-12b": _neox(36, 5120, 40, 50688),
    # GPT-NeoX-20B (Black et al. 2022).
    "gpt-neox-20b": _neox(44, 6144, 64, 50432),
    # BERT (Devlin et al. 2019).
    "bert-base-uncased": _bert(12, 768, 12),
    "bert-large-uncased": _bert(24, 1024, 16),
    # Llama 2 (Touvron et al. 2023) and Llama 3 (Meta 2024).
    "llama-2-7b": _llama(32, 4096, 32, 32, 11008, 32000, 4096),
    "llama-2-13b": _llama(40, 5120, 40, 40, 13824, 32000, 4096),
    "llama-2-70b": _llama(80, 8192, 64, 8, 28672, 32000, 4096),
    "llama-3-8b": _llama(32, 4096, 32, 8, 14336, 128256, 8192),
    # GPT-3 175B (Brown et al. 2020, Table 2.1).
    "gpt3-175b": _gpt2(96, 12288, 96, positions=2048),
    # Korthikanti et al. 2022, Table 3: GPT shapes with v = 51200, s = 2048.
    "megatron-22b": _gpt2(48, 6144, 64, vocab=51200, positions=2048),
    "megatron-175b": _gpt2(96, 12288, 96, vocab=51200, positions=2048),
    "megatron-530b": _gpt2(105, 20480, 128, vocab=51200, positions=2048),
    "megatron-1t": _gpt2(128, 25600, 160, vocab=51200, positions=2048),
}


def load_config(path: str | Path) -> Architecture:
    """Read a transformers `config.json` from disk."""
    p = Path(path)
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"model config not found: {path}") from None
    except IsADirectoryError:
        return load_config(p / "config.json")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return from_hf_config(cfg, str(path))


HUB = Path(__file__).parent / "hub"
"""Published config.json files (models/hub/SOURCES.md): `--model qwen2-7b` reads models/hub/qwen2-7b.json."""


def hub_names() -> list[str]:
    return sorted(p.stem for p in HUB.glob("*.json"))


def resolve(model: str) -> Architecture:
    """A preset name (case-insensitive), a published config's name (models/hub/), or a path to a transformers
    config.json (or its folder)."""
    key = model.lower()
    if key in PRESETS:
        return PRESETS[key]
    if key in hub_names():
        return load_config(HUB / f"{key}.json")
    if model.endswith(".json") or "/" in model or Path(model).exists():
        return load_config(model)
    raise ValueError(f"unknown model {model!r}; presets: {', '.join(PRESETS)}; published configs: "
                     f"{', '.join(hub_names())}; or a path to a config.json")  # fmt: skip
