"""`python -m data.synth <command> --help`: synthetic document corpora (see docs/synth.md)."""
from data.synth.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
