"""Training and evaluating Medusa heads.

- :mod:`.prompts`: the offline training prompt generator;
- :mod:`.data`: self-distillation answers and hidden-state features (engine only);
- :mod:`.trainer`: Medusa-1 head training (needs torch: ``pip install 'medusa_rt[train]'``);
- :mod:`.tree_fit`: trees grown from per-head, per-rank accuracy tables;
- :mod:`.heads_np`: heads applied in NumPy (accuracy tables without torch);
- :mod:`.evaluate`: tokens per step on the held-out evaluation set;
- :mod:`.pipeline`: the ``medusa-rt train-heads`` pipeline.
"""
