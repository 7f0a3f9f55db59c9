"""Inference: the search (greedy and beam), the Translator that wraps a checkpoint for it, and the
CTranslate2 export."""
