"""``qat generate``: stream text from a folder written by ``qat.export_genai``, through onnxruntime-genai.

The prompt goes through the folder's chat template when its tokenizer has one (``--raw`` skips
it); decoding is greedy unless the folder's ``genai_config.json`` says otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qat.errors import QATError


def _runtime() -> Any:
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise QATError("qat generate needs onnxruntime-genai: pip install 'lightning-qat[genai]'")
    import onnxruntime_genai as og

    return og


def has_chat_template(folder: Path) -> bool:
    """Whether the folder's tokenizer carries a chat template (a ``chat_template.jinja`` file or a
    ``chat_template`` entry in ``tokenizer_config.json``)."""
    if (folder / "chat_template.jinja").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def generate(folder: str | os.PathLike[str], prompt: str, *, max_new_tokens: int = 128, chat: bool = True,
             write: Callable[[str], Any] | None = None) -> str:
    """Generate a reply to ``prompt`` with the exported model in ``folder``, writing each piece of
    text as it is decoded (default: to stdout); return the whole reply.

    Args:
        folder: a folder written by :func:`qat.export_genai` (or onnxruntime-genai's builder).
        prompt: the user's text.
        max_new_tokens: the most tokens to generate.
        chat: apply the tokenizer's chat template (a user turn, then the assistant's) when it has one.
        write: called with each decoded piece of text.
    """
    folder = Path(folder)
    if not (folder / "genai_config.json").is_file():
        raise QATError(f"`{folder}` has no genai_config.json: give a folder written by `qat export --genai` or qat.export_genai")
    if max_new_tokens < 1:
        raise QATError(f"--max-new-tokens must be at least 1; got {max_new_tokens}")
    og = _runtime()
    write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    text = prompt
    if chat and has_chat_template(folder):
        text = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": prompt}]), add_generation_prompt=True)
    ids = tokenizer.encode(text)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(ids[None] if getattr(ids, "ndim", 1) == 1 else ids)
    stream, pieces = tokenizer.create_stream(), []
    while not generator.is_done():
        generator.generate_next_token()
        piece = stream.decode(int(generator.get_next_tokens()[0]))
        pieces.append(piece)
        write(piece)
    write("\n")
    return "".join(pieces)
