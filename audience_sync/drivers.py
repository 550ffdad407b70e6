"""Which package provides a SQLAlchemy URL's database driver, for the error a missing one raises.

SQLite needs nothing; PostgreSQL's drivers (psycopg, and ADBC for fast reads) are the
``[postgres]`` extra, so a plain ``pip install audience-sync`` stays small.
"""

from __future__ import annotations

__all__ = ["url_error"]

# Module SQLAlchemy imports -> what to install. Other dialects' drivers are named as-is.
_PACKAGES = {
    "psycopg": "'audience-sync[postgres]'",
    "psycopg2": "psycopg2-binary (or write the URL as postgresql+psycopg:// and install "
    "'audience-sync[postgres]')",
    "MySQLdb": "mysqlclient",
    "snowflake": "snowflake-sqlalchemy",
}


def url_error(setting: str, exc: Exception) -> str:
    """Why the URL in ``setting`` cannot be used; for a missing driver, what to ``pip install``."""
    if isinstance(exc, ImportError):
        module = (exc.name or "").split(".")[0]
        if module:
            package = _PACKAGES.get(module, module)
            return (
                f"{setting} needs the database driver {module!r}, which is not installed: "
                f"pip install {package}"
            )
    return f"{setting} is not a usable SQLAlchemy URL: {exc}"
