"""One loader for the saved tokenizers of pretrained models, shared by the data modules and the exporter.

:func:`load_hf_tokenizer` reads a ``tokenizer.json`` file, a local Hugging Face tokenizer folder,
or the tokenizer a GGUF file carries, offline, as a Hugging Face fast tokenizer: the text data
modules encode with its Rust backend (:func:`qat.app.data.tokenizer.load_tokenizer`) and
:func:`qat.export_genai` saves it into the folder onnxruntime-genai reads. Whatever goes wrong comes
back as one :class:`~qat.errors.QATError` naming the file.

Example:
    >>> from pathlib import Path
    >>> load_hf_tokenizer(Path("no/such/tokenizer.json"))
    Traceback (most recent call last):
    ...
    qat.errors.QATError: tokenizer: `no/such/tokenizer.json` does not exist
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from qat.errors import QATError


def load_hf_tokenizer(path: Path) -> Any:
    """A ``PreTrainedTokenizerFast`` from a ``tokenizer.json`` file, a ``.gguf`` file or a tokenizer
    folder (``AutoTokenizer.from_pretrained(..., local_files_only=True)``)."""
    if not path.exists():
        raise QATError(f"tokenizer: `{path}` does not exist")
    missing = [name for name in ("transformers", *(("gguf",) if path.suffix == ".gguf" else ())) if importlib.util.find_spec(name) is None]
    if missing:
        extra = "lightning-qat[gguf]" if path.suffix == ".gguf" else "transformers"
        raise QATError(f"tokenizer: reading `{path.name}` needs {' and '.join(missing)}: pip install '{extra}'")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if path.suffix == ".json":
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
        elif path.suffix == ".gguf":
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers: OSError, ValueError, KeyError…; gguf's reader: struct.error; the Rust loader: Exception
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise QATError(f"tokenizer: transformers cannot read `{path}` ({first_line})") from e
    if not getattr(tokenizer, "is_fast", False):
        raise QATError(f"tokenizer: `{path}` has no fast (Rust) tokenizer; save one with tokenizer.save_pretrained() "
                       "from a PreTrainedTokenizerFast")
    return tokenizer
