"""`python -m catdog_glm ...` works like `catdog ...` (and is what `torchrun -m catdog_glm` runs)."""

from catdog_glm.cli import main

if __name__ == "__main__":
    main()
