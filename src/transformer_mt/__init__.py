"""transformer-mt: train, evaluate and use encoder-decoder Transformers for machine translation."""

__version__ = "0.1.0"
