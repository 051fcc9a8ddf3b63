"""python -m els_audit: the same command as the els-audit console script."""

from .cli import main

if __name__ == "__main__":
    main()
