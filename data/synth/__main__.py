"""`python -m data.synth <command> --help`: synthetic document corpora (see docs/synth.md)."""
import sys

import exit_codes
from data.synth.cli import main

if __name__ == "__main__":
    sys.exit(exit_codes.run(main, "python -m data.synth"))
