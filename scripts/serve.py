"""Serve a checkpoint over HTTP: `python scripts/serve.py saved/<run>/best.pt [--port 8000]`.

Needs the `serve` extra; `--help` lists every option.
"""

from transformer_mt.cli.serve import main

if __name__ == "__main__":
    main()
