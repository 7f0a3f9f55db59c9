"""The Hydra configs of the entry points, shipped inside the package (`pkg://transformer_mt.configs`).

`train.yaml`, `evaluate.yaml` and `prepare.yaml` are the primary configs; each folder is a config
group (`model=small`, `experiment=cpu`, ...). In a checkout, `configs/` at the top links here.
"""
