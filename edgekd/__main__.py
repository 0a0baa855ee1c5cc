"""``python -m edgekd`` (and ``torchrun ... -m edgekd compress ...``): the ``edgekd`` command."""

from edgekd.cli import main

if __name__ == "__main__":
    main()
