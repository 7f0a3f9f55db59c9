"""Train a model: `python scripts/train.py [Hydra overrides]`, e.g. `model=small trainer.max_epochs=20`.

See transformer_mt.cli.train for the options; every key and default is in src/transformer_mt/config.py.
"""

from transformer_mt.cli.train import main

if __name__ == "__main__":
    main()
