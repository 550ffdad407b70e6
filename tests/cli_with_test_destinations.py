"""Run the real ``audience-sync`` CLI with the test-only destinations registered.

    python tests/cli_with_test_destinations.py serve --config F

Same entry point as the console script; only the destination registry gains ``slow_jsonl``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from audience_sync import destinations
from audience_sync.cli import console_main

destinations._REGISTRY["slow_jsonl"] = "slow_destination:SlowJsonlDestination"

if __name__ == "__main__":
    console_main()
