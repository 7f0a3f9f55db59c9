"""Translate sentences: `python scripts/translate.py saved/<run>/best.pt "Ein Mann fährt Fahrrad."`.

Reads stdin when no sentence is given; `--help` lists every option.
"""

from transformer_mt.cli.translate import main

if __name__ == "__main__":
    main()
