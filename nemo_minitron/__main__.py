"""`python -m nemo_minitron <stage> ...` (also under torchrun) = the `minitron` console script."""

from nemo_minitron.cli.main import main

main()
