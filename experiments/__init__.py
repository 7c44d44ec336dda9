"""The experiment layer: sweeps over mixture shares, seeds, corpora, document counts and models (`python sweep.py`),
and the durability pipeline (`python -m experiments.durability`). It drives train.py and the eval modules; nothing
below it imports it."""
