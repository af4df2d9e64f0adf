"""The Random User ETL's machinery, one module per part; random_user_etl.py composes it and is the public API.

Modules import only those below them: shown; places; errors; wire; answer; client; contract; folders; staging;
sort; raw; store; pipeline. Nothing here is a stable interface.
"""

__version__ = "1.0.0"  # the one place the version is written: pyproject.toml reads it
