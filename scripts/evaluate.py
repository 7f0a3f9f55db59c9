"""Score a checkpoint: `python scripts/evaluate.py checkpoint=saved/<run>/best.pt split=test2016 decode=beam`.

See transformer_mt.cli.evaluate for every option.
"""

from transformer_mt.cli.evaluate import main

if __name__ == "__main__":
    main()
