"""Optional integrations (each needs its extra; nothing in the core imports them):

- :mod:`els_audit.integrations.mlflow`: ``pip install els-audit[mlflow]``.
"""
