"""The bundled tiny model: where it lives and the settings it was built with.

``krpo_fast/assets/tiny_llama`` holds a character-level Llama (tokenizer, config,
safetensors) SFT-pretrained on the arithmetic task; it loads offline with
``AutoTokenizer`` and ``AutoModelForCausalLM``. Its ``krpo_fast.json`` records the system
prompt it was trained with (the trainer's default for it), its completion formats, the
training recipe and results. ``scripts/build_tiny_model.py`` in the repository rebuilds it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_NAME = "krpo_fast.json"


def bundled_model_path() -> Path:
    """Folder of the bundled tiny model (tokenizer, config, safetensors, krpo_fast.json)."""
    return Path(__file__).resolve().parent / "assets" / "tiny_llama"


def load_model_defaults(path: str | Path) -> dict[str, Any]:
    """The ``krpo_fast.json`` of a model folder (system prompt, recipe), or ``{}`` if absent."""
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return {}
    return json.loads(config.read_text(encoding="utf-8"))
