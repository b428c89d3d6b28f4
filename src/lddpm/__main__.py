"""Allow `python -m lddpm ...` (and `torchrun -m lddpm train ...`)."""

from lddpm.cli import entry

if __name__ == "__main__":
    entry()
