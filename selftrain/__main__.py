"""`python -m selftrain` runs the same CLI as the `selftrain` console script."""

from selftrain.cli import main

main()
