"""`foundry report`: pictures of runs, drawn from their metrics.jsonl."""
