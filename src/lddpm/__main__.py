"""Allow `python -m lddpm ...` (and `torchrun -m lddpm train ...`)."""

from lddpm.cli import main

if __name__ == "__main__":
    main()
