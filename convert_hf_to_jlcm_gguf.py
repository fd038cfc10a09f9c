#!/usr/bin/env python3
"""Convert a Hugging Face Llama checkpoint to a JLCM GGUF file (the console script jlcm-convert)."""
import sys

from jlcm_gguf.cli import main

if __name__ == "__main__":
    sys.exit(main())
