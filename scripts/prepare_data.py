"""Fetch, tokenize and cache a corpus: `python scripts/prepare_data.py [data.src=en data.tgt=fr ...]`."""

from transformer_mt.cli.prepare import main

if __name__ == "__main__":  # the preparation's worker processes import this file again
    main()
