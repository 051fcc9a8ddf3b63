"""First-party els-audit plugins (installed as ``els_audit_plugins``).

They register through the same entry-point groups a third-party plugin uses; see the
``[project.entry-points.*]`` tables in ``pyproject.toml``.
"""
