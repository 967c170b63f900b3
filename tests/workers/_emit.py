"""Workers report results as JSON lines in $RESULT_DIR/rank<N>.jsonl (stdout interleaves across ranks)."""

import json
import os


def emit(obj) -> None:
    path = os.path.join(os.environ["RESULT_DIR"], f"rank{os.environ.get('RANK', '0')}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
