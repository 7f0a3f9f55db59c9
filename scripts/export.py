"""Export a checkpoint to CTranslate2: `python scripts/export.py saved/<run>/averaged.pt exported/<name>`."""

from transformer_mt.cli.export import main

if __name__ == "__main__":
    main()
