"""The data pipeline, one stage per file, in the order the data flows:

    corpus.py     fetch Multi30k (or take a custom corpus), verify SHA-256 sums, read parallel text
    tokenize.py   spaCy blank tokenizers; the detokenizer for model output (sacremoses + rules)
    vocab.py      token <-> id, fixed specials PAD=0 UNK=1 BOS=2 EOS=3
    dataset.py    prepare once (tokenize, subwords, vocabularies, ids), load in a second
    cache.py      the prepared cache on disk under <data.root>/cache/<key>/: key, write, read
    buckets.py    which sentences share a batch: length sorting, token-budget packing, padding share
    batching.py   the per-epoch sampler (TokenBucketSampler), collate -> Batch

Nothing is imported here, so that `from transformer_mt.data.vocab import PAD` stays cheap: spaCy is
only loaded by tokenize.py, torch only by batching.py.
"""
