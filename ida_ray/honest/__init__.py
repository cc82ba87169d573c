"""Answering questions honestly (seed 001; ALGORITHM.md section 5): a two-headed model, the
two-stage objective with its alternating optimiser, simple/complex labelling processes, and
confident comparisons.

  two_headed.py   trunk + intended head + instrumental head; HF save/load
  objective.py    HonestConfig, C, the L2 anchors, HonestTrainer (θ₂ step, then θ₁ step)
  labels.py       simple and complex labellers; small and large datasets
  comparisons.py  confident judge, proposals, the comparison likelihood
  decoding.py     greedy / sampled answers from one head
  fit.py          training loops (likelihood mode, comparison mode)
"""
