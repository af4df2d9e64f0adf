"""The Random User ETL's machinery, one module per part; random_user_etl.py composes it and is the public API.

Modules import only those before them: shown; places; errors; stop; own_process; wire; answer; client;
contract; folders; staging; sort; raw; arrow; upload; objects; lake; store; progress; run; sources; delta;
pseudonym (own_process imports its jobs' modules, upload and delta, only in the child that does the
job). Nothing here is a stable interface.
"""

__version__ = "1.0.0"  # the one place the version is written: pyproject.toml reads it
