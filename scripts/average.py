"""Average a run's last epoch checkpoints: `python scripts/average.py saved/<run> [--last 5] [--output PATH]`."""

from transformer_mt.cli.average import main

if __name__ == "__main__":
    main()
