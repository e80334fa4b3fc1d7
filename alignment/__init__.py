"""Token and vocabulary alignment across tokenizers (pure NumPy/SciPy, no training code).

pieces: each token's bytes; sequence: byte-position alignment + DTW fallback; content: message-content
restriction; vocab: the source->pivot vocabulary map; project: top-K distributions projected onto the pivot.
"""
