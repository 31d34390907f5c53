"""`python -m zlh.cli`: the zlh program by module path (cron entries use this)."""

from zlh.cli import main

main()
