"""Drop-in use of krpo-fast inside other trainers.

- ``krpo_fast.integrations.trl``: ``KRPOGRPOTrainer``, a TRL ``GRPOTrainer`` whose
  advantages and loss are krpo-fast's fused ops.
- ``krpo_fast.integrations.verl``: registers the ``"krpo"`` advantage estimator and the
  ``"krpo_fused"`` policy loss with verl.

Each submodule imports its framework, so this package imports neither.
"""
