"""The seed experiments as library code, one module per ``python -m logitstd_kernels`` command.

- :mod:`.toy`: the paper's toy cases (Figure 2 and a 10-class case), ``toy``.
- :mod:`.analyze_cli`: conflict analysis of saved logits (:mod:`logitstd_kernels.analysis`), ``analyze``.
- :mod:`.distill`: Algorithm 2 on scikit-learn's digits (CE vs KD vs KD + standardization), ``distill``;
  with ``--method``, :mod:`.distill_methods`: the paper's methods (:mod:`.kd_methods`), plain and
  standardized, and their table (:mod:`.method_table`).
- :mod:`.ghost`: ghost-logit ("subliminal") distillation on digits, ``ghost``.

``toy`` and ``analyze`` need only the package's own dependencies; ``distill``, ``ghost``, the
digits demo of ``analyze`` and every plot need the ``examples`` extra
(``pip install --no-build-isolation -e .[examples]``: scikit-learn, matplotlib, tqdm). Shared pieces: :mod:`.deps`
(optional imports, progress bars), :mod:`.digits` (the data), :mod:`.mlp` (the model),
:mod:`.training` (minibatch loop, accuracy), :mod:`.results` (JSON, tables, plots).
"""
