#!/usr/bin/env python3
"""The CPU benchmark suite (same as `medusa-rt bench`): decode (fp32/bf16/fp16) next to the
measured memory-bandwidth bound, Medusa with the shipped heads and the machine-sized tree against
plain decoding, verify-step latency against tree size, prefill, and peers (HF transformers;
llama.cpp when llama-cpp-python is installed), all measured in one run. JSON on stdout, a table
and progress on stderr.

    python bench/bench_suite.py [--no-hf] [--no-llama-cpp] [--prompts 12] [--json out.json]
"""

import sys

from medusa_rt.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
