"""Choosing what to transfer, before and around fine-tuning.

Frozen features of zoo backbones and what is measured on them: transferability
scores (LogME, LEEP, k-NN, ridge probe; `tlflax.rank` is the command), few-shot
evaluation and episodic (meta-transfer) training.
"""
