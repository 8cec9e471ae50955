"""`ray job submit --working-dir . -- python jobs/tile.py --slides S3_PREFIX --out S3_URI [key=value …]`

A thin entry point over `hipt-ray tile`; inside a Ray job RAY_ADDRESS points at the cluster.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the submitted working dir

from hipt_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tile", *sys.argv[1:]]))
