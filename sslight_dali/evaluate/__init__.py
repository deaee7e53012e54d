"""`sslight eval linear|semi|knn CHECKPOINT`: a pre-trained backbone measured with the reference's protocols.

common.py holds what the three share (the eval run's config and output directory, feature extractors,
accuracy over ranks, the per-epoch training loop with checkpoints and exact resume); linear.py, semi.py
and knn.py are the commands.
"""
