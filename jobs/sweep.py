"""`ray job submit --working-dir . -- python jobs/sweep.py --out EMBED_OUT --labels LABELS
--task subtyping [key=value …]`

A thin entry point over `hipt-ray sweep`; inside a Ray job RAY_ADDRESS points at the cluster.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the submitted working dir

from hipt_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
