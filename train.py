"""`python train.py <flags>`: the whole mesh on this machine, as in slime/miles."""

from slipstream.cli import main

if __name__ == "__main__":
    import sys

    main(["train", *sys.argv[1:]])
