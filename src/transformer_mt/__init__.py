"""transformer-mt: train, evaluate and use encoder-decoder Transformers for machine translation.

From Python, translate with a trained checkpoint:

    from transformer_mt import Translator

    translator = Translator.from_checkpoint("saved/cpu-de-en/averaged.pt")
    translator.translate(["Ein Hund rennt durch den Schnee."], beam_size=5)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Translator", "__version__"]

if TYPE_CHECKING:
    from transformer_mt.inference.translator import Translator


def __getattr__(name: str) -> Any:
    # `Translator` loads torch: imported on first use, so `import transformer_mt` stays light.
    if name == "Translator":
        from transformer_mt.inference.translator import Translator

        return Translator
    raise AttributeError(f"module 'transformer_mt' has no attribute {name!r}")
